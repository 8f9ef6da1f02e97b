"""Training data: the embedded default corpus and token batches; the dataset store and leases come later."""  # noqa: E501
