"""`tridlm serve [--model PATH]`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one model."""

from __future__ import annotations

import argparse
import os

from tridlm.decoding.params import MODES

from .generate import add_load_args

HELP = """\
Endpoints: GET /v1/models, POST /v1/completions (a `suffix` makes the completion the middle), POST
/v1/chat/completions, POST /v1/revise, GET /health, GET /metrics.
Each request may choose its decoding with extra body fields: mode (ar, diffusion, spec, spec-quadratic,
auto), block_length (an integer or "auto"), threshold, steps, selection_policy, top_k, ignore_eos.
mode "auto" picks self-speculation while fewer than --auto-spec-below rows are active, its drafts
are being accepted (--auto-min-acceptance) and it has decoded faster alone than AR (both timed here),
else AR (both give the same text at temperature 0); greedy spec and spec-quadratic requests likewise
decode as AR once --spec-off-at rows are active; the response's `mode` says which ran.

  tridlm serve --model out/tiny --port 8000
  curl 127.0.0.1:8000/v1/completions -d '{"prompt": "To be", "max_tokens": 32, "mode": "spec"}'"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API", description=HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, metavar="PATH", help="a tridlm checkpoint folder or 'smollm2' "
                   "(default: the default model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--api-key", default=os.environ.get("TRIDLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $TRIDLM_API_KEY, else no auth)")
    p.add_argument("--default-mode", default="auto", choices=(*MODES, "auto"),
                   help="mode of requests that name none (default auto)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: folder name)")
    p.add_argument("--max-running", type=int, default=16, help="rows decoded together (default 16)")
    p.add_argument("--max-queue", type=int, default=64, help="rows waiting for a slot before 429 (default 64)")
    p.add_argument("--auto-spec-below", type=int, default=4,
                   help='mode "auto": self-speculation while fewer rows than this are active (default 4)')
    p.add_argument("--auto-min-acceptance", type=float, default=2.0,
                   help='mode "auto": use AR even at low load once self-speculation has averaged fewer accepted '
                        "tokens per verification than this (default 2; 0 = never)")
    p.add_argument("--spec-off-at", type=int, default=4, metavar="ROWS",
                   help="greedy spec / spec-quadratic requests that arrive while this many rows are running or "
                        "waiting decode as AR, which gives the same text without a draft per row in a busy batch "
                        "(default 4; -1 = always speculate)")
    p.add_argument("--max-tokens-cap", type=int, default=2048, help="largest max_tokens accepted (default 2048)")
    p.add_argument("--max-n", type=int, default=8, help="largest n accepted (default 8)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    p.add_argument("--default-temperature", type=float, default=0.0,
                   help="temperature of requests that give none (default 0: greedy)")
    add_load_args(p)
    p.add_argument("--batch-invariant", action="store_true",
                   help="bf16 forwards in which each row gets the bits it gets alone: greedy results are the same "
                        "solo and in any batch (bf16 rounding otherwise flips near ties), and speculation turned off "
                        "under load stays exact; implies --dtype bfloat16; CPU, eager kernels; chooses its kernels "
                        "(AMX where the CPU has it) by measuring once per machine (about 10 s for the default model "
                        "on 2 cores)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=run)


def checked_batch_invariant(args, device: str) -> None:
    """--batch-invariant's conflicts, refused before the model loads; a missing --dtype becomes bfloat16."""
    if args.dtype not in (None, "bfloat16"):
        raise SystemExit(f"--batch-invariant runs bf16 forwards: drop --dtype {args.dtype} or pass --dtype bfloat16")
    if args.kernels != "eager":
        raise SystemExit("--batch-invariant runs eager forwards: drop --kernels compiled")
    if not device.startswith("cpu"):
        raise SystemExit(f"--batch-invariant runs on a CPU, not {device}: pass --device cpu")
    args.dtype = "bfloat16"


def build_app(args):
    import torch

    from tridlm.commands.generate import prepared
    from tridlm.default_model import locate_model
    from tridlm.engine import off_this_thread
    from tridlm.server import EngineConfig, Limits, ServerConfig, create_app

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.batch_invariant:
        checked_batch_invariant(args, device)
    source = locate_model(args.model, draft_adapter=not args.no_draft_adapter)  # None: the default model

    def load():
        model = prepared(source.load(device=device), args)
        return model.set_batch_invariant() if args.batch_invariant else model

    # loaded and warmed off the main thread, so the engine's worker holds the only OpenMP pool
    model = off_this_thread(load)
    served = {"default": "tridlm-default", "smollm2": "smollm2"}.get(source.kind)
    name = args.served_model_name or served or os.path.basename(os.path.normpath(str(source.folder)))
    config = ServerConfig(
        model_name=name, api_key=args.api_key or None, max_body_bytes=args.max_body_bytes,
        limits=Limits(default_mode=args.default_mode, default_temperature=args.default_temperature,
                      max_tokens_cap=args.max_tokens_cap, max_n=args.max_n),
        engine=EngineConfig(max_running=args.max_running, max_queue=args.max_queue,
                            auto_spec_below=args.auto_spec_below, auto_min_acceptance=args.auto_min_acceptance,
                            spec_off_at=None if args.spec_off_at < 0 else args.spec_off_at))
    return create_app(model, config=config), name


def run(args) -> int:
    import uvicorn

    app, name = build_app(args)
    print(f"tridlm serve: {name} on http://{args.host}:{args.port}/v1"
          + (" (API key required)" if args.api_key else ""), flush=True)
    class DrainingServer(uvicorn.Server):
        """SIGTERM / SIGINT: new requests get 503, running ones end now with a 503 (non-streaming) or an
        SSE error event (streaming), then uvicorn closes the connections and exits."""

        def handle_exit(self, sig, frame):
            if not self.should_exit:
                app.state.drain()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=5)
    DrainingServer(config).run()
    return 0
