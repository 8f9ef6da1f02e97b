"""The `crowdtrain` command: server, node, demo."""

from __future__ import annotations

import logging
import signal
import socket
import threading
from pathlib import Path

import typer

from crowdtrain import __version__
from crowdtrain.admin_cli import audit, nodes_app, tokens_app
from crowdtrain.data.cli import data_app
from crowdtrain.models_cli import models_app
from crowdtrain.settings import NodeSettings, ServerSettings, SettingsError, load_settings
from crowdtrain.terminal import CONFIG_HELP, console
from crowdtrain.terminal import fail as _fail

app = typer.Typer(
    help="crowdtrain: train a GPT-style language model together with other people's machines.\n\n"
    "Start a coordinator with `crowdtrain server`, join it from any machine with "
    "`crowdtrain node --server URL`, or try both on this machine with `crowdtrain demo`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        print(f"crowdtrain {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log more detail."),
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@app.command()
def server(
    config: Path | None = typer.Option(None, "--config", help=CONFIG_HELP),
    host: str | None = typer.Option(
        None,
        help="Address to listen on (default: 127.0.0.1); "
        "0.0.0.0 accepts nodes from other machines.",
    ),
    port: int | None = typer.Option(None, help="TCP port (default: 8000); 0 picks a free one."),
    data_dir: Path | None = typer.Option(
        None,
        help="Where checkpoints, the tokenizer and the history live (default: ./crowdtrain-data).",
    ),
    model: str | None = typer.Option(
        None,
        help="Model preset: tiny (~1M params, CPU), small, gpt2-124m, gpt2-350m (default: tiny).",
    ),
    min_nodes: int | None = typer.Option(
        None, help="Updates from this many distinct nodes close a round (default: 1)."
    ),
    round_deadline: float | None = typer.Option(
        None, "--round-deadline", help="Seconds after a round's first update when it closes anyway."
    ),
    algorithm: str | None = typer.Option(
        None,
        help="sync (default): nodes send gradients every step; diloco: nodes run "
        "--inner-steps local steps and send the change, for slow links.",
    ),
    inner_steps: int | None = typer.Option(
        None, help="diloco: local AdamW steps per update (default: 50)."
    ),
    lr: float | None = typer.Option(None, help="Peak learning rate of the server optimizer."),
    optimizer: str | None = typer.Option(None, help="Server optimizer: adamw or nesterov."),
    max_staleness: int | None = typer.Option(
        None, help="Accept updates computed on weights at most this many versions old."
    ),
    checkpoint_every: int | None = typer.Option(None, help="Write a checkpoint every N versions."),
    seed: int | None = typer.Option(None, help="Seed of the initial weights."),
    dataset: str | None = typer.Option(
        None,
        help="Train on this dataset from `crowdtrain data import` (default: the built-in "
        "corpus, imported as 'pydoc-topics').",
    ),
    objective: str | None = typer.Option(
        None,
        help="pretrain (default): next-token loss on the train split; sft: fine-tune on the "
        "annotated split, with loss on the responses only.",
    ),
    shard_tokens: int | None = typer.Option(
        None, help="Tokens per shard that nodes lease (default: 65536)."
    ),
    lease_ttl: float | None = typer.Option(
        None,
        "--lease-ttl",
        help="Seconds a shard lease lasts without renewal before it is re-issued (default: 60).",
    ),
    tls_cert: Path | None = typer.Option(
        None,
        "--tls-cert",
        metavar="FILE",
        help="Serve HTTPS/WSS with this PEM certificate (chain); needs --tls-key.",
    ),
    tls_key: Path | None = typer.Option(
        None, "--tls-key", metavar="FILE", help="The PEM private key of --tls-cert."
    ),
    self_signed: bool | None = typer.Option(
        None,
        "--self-signed",
        help="Serve HTTPS with a development certificate kept in --data-dir/tls, and print "
        "its SHA-256 fingerprint for nodes to pin (--pin-sha256).",
    ),
    trusted_proxies: str | None = typer.Option(
        None,
        "--trusted-proxies",
        help="Comma-separated addresses of reverse proxies whose X-Forwarded-For/-Proto "
        "headers are believed (default: 127.0.0.1; '*' trusts any).",
    ),
    root_path: str | None = typer.Option(
        None,
        "--root-path",
        help="The path prefix a reverse proxy serves the API under, like /crowdtrain.",
    ),
) -> None:
    """Run the coordinator: it holds the model, takes updates from nodes, and publishes versions.

    It resumes from the newest valid checkpoint in --data-dir. Ctrl-C (or SIGTERM) applies the
    updates already accepted and writes a final checkpoint before exiting. The HTTP API lives
    under /api/v1; its interactive documentation is at /docs.

    Every setting (more than the flags below) can also come from a CROWDTRAIN_* environment
    variable or a TOML file given with --config; see docs/configuration.md.
    """
    from crowdtrain.db import DatabaseError
    from crowdtrain.server.app import run_server
    from crowdtrain.server.tls import fingerprint_sha256, served_certificate

    try:
        settings = load_settings(
            ServerSettings,
            config,
            host=host,
            port=port,
            data_dir=data_dir,
            model=model,
            min_nodes=min_nodes,
            round_deadline_s=round_deadline,
            algorithm=algorithm,
            inner_steps=inner_steps,
            lr=lr,
            optimizer=optimizer,
            max_staleness=max_staleness,
            checkpoint_every=checkpoint_every,
            seed=seed,
            dataset=dataset,
            objective=objective,
            shard_tokens=shard_tokens,
            lease_ttl_s=lease_ttl,
            tls_cert=tls_cert,
            tls_key=tls_key,
            self_signed=self_signed,
            trusted_proxies=trusted_proxies,
            root_path=root_path,
        )
    except SettingsError as exc:
        _fail(str(exc))

    def ready(runtime, url: str) -> None:
        resumed = (
            f"resumed from checkpoint at version {runtime.resumed_from}"
            if runtime.resumed_from is not None
            else "new run at version 0"
        )
        print(
            f"crowdtrain server listening on {url} ({resumed}; model {settings.model}, "
            f"{runtime.manifest.numel:,} parameters)",
            flush=True,
        )
        data = runtime.train_data
        print(
            f"training data: {data.dataset}/{data.split}, {data.tokens:,} tokens in "
            f"{len(data.shards)} shards",
            flush=True,
        )
        print(f"web UI: {url}/ui/  API docs: {url}/docs", flush=True)
        pin = None
        certificate = served_certificate(settings)
        if certificate is not None:
            fingerprint = fingerprint_sha256(certificate.read_bytes())
            print(f"TLS certificate {certificate}, SHA-256 fingerprint {fingerprint}", flush=True)
            pin = fingerprint if settings.self_signed else None
        if runtime.security.new_admin_token is not None:  # printed at once, see below
            admin_server = f" --server {url}" + (f" --pin-sha256 {pin}" if pin else "")
            print(
                "nodes need an enrollment token: crowdtrain tokens create --role node "
                f"--uses 10 --expires 7d{admin_server}",
                flush=True,
            )
        print(f"join with: {_join_command(url, pin)} --token ct_enroll_...", flush=True)

    def show_admin_token(token: str) -> None:
        """A new data directory's admin token: shown this once (only its hash is kept), first
        thing, so that a start that fails later still shows it."""
        print(
            f"admin token (shown only now; store it, e.g. as CROWDTRAIN_ADMIN_TOKEN): {token}",
            flush=True,
        )

    try:
        run_server(settings, on_ready=ready, on_admin_token=show_admin_token)
    except (SettingsError, DatabaseError, ValueError, OSError) as exc:
        _fail(str(exc))


def _join_command(url: str, pin: str | None) -> str:
    """The node command line for a server listening on `url`."""
    for wildcard in ("//0.0.0.0:", "//[::]:"):  # other machines reach it by this one's name
        url = url.replace(wildcard, f"//{socket.gethostname()}:")
    return f"crowdtrain node --server {url}" + (f" --pin-sha256 {pin}" if pin else "")


@app.command()
def node(
    server: str | None = typer.Option(
        None, "--server", "-s", help="The coordinator's URL (default: http://127.0.0.1:8000)."
    ),
    config: Path | None = typer.Option(None, "--config", help=CONFIG_HELP),
    token: str | None = typer.Option(
        None,
        "--token",
        help="Enrollment token from the server's admin (ct_enroll_...); needed once, to "
        "register this node (also CROWDTRAIN_NODE_TOKEN).",
    ),
    config_dir: Path | None = typer.Option(
        None,
        "--config-dir",
        help="Where the node keeps its identity per server (default: ~/.config/crowdtrain).",
    ),
    ca_cert: Path | None = typer.Option(
        None,
        "--ca-cert",
        metavar="FILE",
        help="Trust only this CA (PEM) for the server's https:// certificate.",
    ),
    pin_sha256: str | None = typer.Option(
        None,
        "--pin-sha256",
        metavar="FINGERPRINT",
        help="Accept only the server certificate with this SHA-256 fingerprint (what a "
        "--self-signed server prints).",
    ),
    name: str | None = typer.Option(
        None,
        help="Name shown by the server (default: the host name). The node keeps one identity "
        "per server and name: a second node on this machine needs a --name of its own.",
    ),
    device: str | None = typer.Option(None, help="auto (cuda when present), cpu, cuda, cuda:N."),
    batch_size: int | None = typer.Option(None, help="Sequences per micro-batch (default: 16)."),
    accumulate: int | None = typer.Option(None, help="Micro-batches per update (default: 1)."),
    density: float | None = typer.Option(
        None,
        help="A fixed fraction of gradient entries sent each update, 0-1. Default: chosen "
        "each update from the measured link, so uploading takes under a fifth of the compute "
        "time. What is not sent is kept and sent later (error feedback).",
    ),
    max_density: float | None = typer.Option(
        None, help="The highest density the controller picks (default: 0.25)."
    ),
    min_density: float | None = typer.Option(
        None, help="The lowest density the controller picks (default: 0.001)."
    ),
    value_codec: str | None = typer.Option(
        None,
        help="How values travel: fp32, fp16 (default), bf16, int8 or int4 (per-block scales), "
        "sign (1 bit per value).",
    ),
    upload_limit: str | None = typer.Option(
        None,
        help="Cap this node's upload speed, in bytes per second, for example 500KB or 2MB "
        "(default: no cap).",
    ),
    data: Path | None = typer.Option(
        None,
        help="Train on your own files (a file or a folder of .txt, .md, .jsonl, .json, .csv, "
        ".parquet, or a saved Hugging Face dataset) instead of the shards the server leases, "
        "where the server allows it.",
    ),
    max_updates: int | None = typer.Option(None, help="Stop after this many updates."),
    duration: float | None = typer.Option(None, help="Stop after this many seconds."),
    threads: int | None = typer.Option(None, help="CPU threads for torch."),
    overlap: bool | None = typer.Option(
        None,
        "--overlap/--no-overlap",
        help="Compute the next step while the last upload is in flight (default: on).",
    ),
    location: str | None = typer.Option(
        None,
        help="Where this node is, shown on the server's node map: 'LAT,LON' (for example "
        "'52.52,13.40') places it on the world map; any other text is only shown.",
    ),
) -> None:
    """Join a training run: pull the model, lease data shards, train, push compressed updates.

    The node keeps retrying while the server is unreachable and resyncs by itself after a
    server restart. Ctrl-C finishes the upload in flight and exits.

    Every setting can also come from a CROWDTRAIN_NODE_* environment variable or a TOML file
    given with --config; see docs/configuration.md.
    """
    from crowdtrain.node.client import Stopped
    from crowdtrain.node.runner import Node

    try:
        settings = load_settings(
            NodeSettings,
            config,
            server=server,
            token=token,
            config_dir=config_dir,
            ca_cert=ca_cert,
            pin_sha256=pin_sha256,
            name=name,
            device=device,
            batch_size=batch_size,
            accumulate=accumulate,
            density=density,
            max_density=max_density,
            min_density=min_density,
            value_codec=value_codec,
            upload_limit=upload_limit,
            data=data,
            max_updates=max_updates,
            duration_s=duration,
            threads=threads,
            overlap=overlap,
            location=location,
        )
    except SettingsError as exc:
        _fail(str(exc))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        stats = Node(settings, stop=stop, console=console).run()
    except Stopped:  # stopped while it waited for the server to check its certificate pin
        raise typer.Exit(0) from None
    except (ValueError, RuntimeError) as exc:
        _fail(str(exc), code=1)
    console.print(
        f"node stopped after {stats.updates} updates ({stats.tokens:,} tokens, "
        f"{stats.refused} refused)",
        highlight=False,
    )


@app.command()
def demo(
    duration: float = typer.Option(120.0, help="Seconds of training."),
    nodes: int = typer.Option(2, min=1, max=16, help="Trainer node processes to start."),
    model: str = typer.Option("tiny", help="Model preset (tiny trains well on a laptop CPU)."),
    density: float = typer.Option(
        0.25, min=1e-4, max=1.0, help="Fraction of entries each node sends per update."
    ),
    port: int = typer.Option(0, help="Server port (0 picks a free one)."),
    data_dir: Path | None = typer.Option(
        None,
        help="Keep the server's data and logs here (default: a temporary folder, removed "
        "after a successful run and kept when something fails).",
    ),
    prompt: str = typer.Option("The for statement", help="Prompt for the sample generation."),
) -> None:
    """Start a server and trainer nodes on this machine, train for a while, and report.

    Uses the built-in corpus (CPython's reference documentation), so it needs no network. Shows
    live progress, prints the API URL, and ends with the validation loss before and after and a
    sample generation from the trained model. Ctrl-C stops every process cleanly.
    """
    from crowdtrain.demo import DemoOptions, run_demo

    raise typer.Exit(
        run_demo(
            DemoOptions(
                duration_s=duration,
                nodes=nodes,
                model=model,
                density=density,
                port=port,
                data_dir=data_dir,
                prompt=prompt,
            ),
            console,
        )
    )


app.add_typer(data_app, name="data")
app.add_typer(tokens_app, name="tokens")
app.add_typer(nodes_app, name="nodes")
app.add_typer(models_app, name="models")
app.command("audit")(audit)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
