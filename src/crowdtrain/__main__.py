"""Allow `python -m crowdtrain`."""

from crowdtrain.cli import main

main()
