"""Command line: ``python -m realtime serve`` and ``python -m realtime client``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys


def _serve(args: argparse.Namespace) -> int:
    import os

    import uvicorn

    from realtime.app import create_app
    from realtime.config import Settings
    from realtime.dialogue import build_dialogue
    from realtime.drain import DrainingServer

    overrides = {
        "host": args.host, "port": args.port, "device": args.device, "capacity": args.capacity,
        "engine_mode": args.engine_mode, "voice_dir": args.voice_dir, "log_level": args.log_level,
        "api_keys": args.api_key or None, "chat_model": args.chat_model, "asr_model": args.asr_model,
        "api_keys_file": args.api_keys_file, "key_max_sessions": args.key_max_sessions, "key_rpm": args.key_rpm,
        "max_session_seconds": args.max_session_seconds, "drain_seconds": args.drain_seconds, "db": args.db,
        "data_dir": args.data_dir, "vision_model": args.vision_model, "adapter_dir": args.adapter_dir,
        "lora_slots": args.lora_slots, "max_lora_rank": args.max_lora_rank, "lora_policy": args.lora_policy,
        "vision_cuda_graphs": args.vision_cuda_graphs, "point_model": args.point_model,
        "demo": args.demo,
    }
    if args.demo is None and "RT_DEMO" not in os.environ:
        overrides["demo"] = True  # serve mounts the Gradio demos at /demo unless RT_DEMO=0 or --no-demo
    settings = Settings.load(overrides)
    settings.db = settings.resolved_db()  # serve keeps records by default (--db none: off)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"loading the dialogue brain: chat model {settings.chat_model}, "
          f"speech recognition {settings.asr_model or 'whisper tiny.en'} ...", flush=True)
    dialogue = build_dialogue(settings, settings.resolved_device())
    vision = None
    if settings.vision_model.lower() != "none":
        from vision.service import build_vision_service

        print(f"loading the vision model {settings.vision_model} (adapters: {settings.adapter_dir or 'none'}) ...",
              flush=True)
        vision = [build_vision_service(settings, settings.resolved_device())]
    if settings.point_model.lower() != "none":
        from vision.service import build_point_service

        print(f"loading the 3D model {settings.point_model} ...", flush=True)
        vision = (vision or []) + [build_point_service(settings, settings.resolved_device())]
    app = create_app(settings, dialogue=dialogue, vision=vision)
    print(f"serving on http://{settings.host}:{settings.port}  (websocket: ws://{settings.host}:{settings.port}/v1/realtime)"
          f"; records: {settings.db or 'off'}", flush=True)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, ws="websockets-sansio", ws_max_size=settings.max_message_bytes,
        log_level=settings.log_level, ws_ping_interval=20, ws_ping_timeout=20,
        timeout_graceful_shutdown=max(1, int(settings.drain_seconds)),  # HTTP requests still running after the drain
    )
    DrainingServer(config, app.state.drain, settings.drain_seconds).run()
    return 0


def _client(args: argparse.Namespace) -> int:
    from realtime.client import converse, read_wav, write_wav

    listen = read_wav(args.listen) if args.listen else None
    result = asyncio.run(converse(args.url, args.say, listen, args.api_key, timeout=args.timeout,
                                  max_output_tokens=args.max_output_tokens))
    write_wav(args.output, result.audio)
    secs = result.audio.shape[0] / 24000
    extra = f", interrupted after {result.interrupted_at_ms} ms" if result.interrupted_at_ms is not None else ""
    print(f"response {result.status}: {secs:.2f} s of audio written to {args.output}{extra}")
    return 0 if result.status is not None else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m realtime", description="Real-time full-duplex voice server and client.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the server (settings also from RT_* environment variables)")
    s.add_argument("--host", help="bind address (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default 8000)")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where the models run (default auto)")
    s.add_argument("--api-key", action="append", help="accepted API key; repeat for several (default: no auth)")
    s.add_argument("--api-keys-file", help="accepted API keys, one per line, each optionally followed by its "
                   "limits: KEY max_sessions=N rpm=N")
    s.add_argument("--key-max-sessions", type=int, help="concurrent sessions per key without its own limit (default 0: "
                   "unlimited)")
    s.add_argument("--key-rpm", type=int, help="new sessions + API requests per minute per key without its own limit "
                   "(default 0: unlimited)")
    s.add_argument("--max-session-seconds", type=float, help="close sessions this old with session_expired "
                   "(default 3600; 0: no limit)")
    s.add_argument("--drain-seconds", type=float, help="on SIGTERM, how long live sessions may finish their "
                   "response before they are closed (default 10)")
    s.add_argument("--db", help="SQLite file of transcripts and usage records (default DATA_DIR/realtime.db; "
                   "none: keep no records)")
    s.add_argument("--data-dir", help="where records are kept (default $XDG_DATA_HOME/duplex-server)")
    s.add_argument("--capacity", type=int, help="concurrent voice sessions before refusing (default 16)")
    s.add_argument("--engine-mode", choices=["batched", "sequential"], help="batched step (default) or one session per step")
    s.add_argument("--voice-dir", help="a folder with codec.safetensors / lslm.safetensors instead of the embedded default")
    s.add_argument("--chat-model", help="what answers: smollm2 (default; SmolLM2-135M-Instruct, offline), echo "
                   "(say back what was said), a local Hugging Face causal-LM folder or a hub name in the local cache")
    s.add_argument("--asr-model", help="what hears the user: default Whisper tiny.en (offline); a CTranslate2 "
                   "(faster-whisper) folder, a transformers Whisper folder, a hub name in the local cache, "
                   "or none")
    s.add_argument("--vision-model", help="the vision-language model: default (EfficientNet-Lite0 + SmolLM2, offline), "
                   "a local Hugging Face LLaVA folder, or none (no /v1/chat/completions)")
    s.add_argument("--point-model", help="the 3D point-cloud model: default (vision/weights3d, offline), a folder of "
                   "the same files, or none")
    s.add_argument("--adapter-dir", help="LoRA adapters in peft's format, one sub-folder each, served by folder name")
    s.add_argument("--lora-slots", type=int, help="adapters resident on the device at once (default 8)")
    s.add_argument("--max-lora-rank", type=int, help="largest adapter rank accepted (default 64)")
    s.add_argument("--lora-policy", choices=["auto", "unmerged", "merged", "mixture"],
                   help="merged/unmerged/mixture switching (default auto: VaLoRA's orchestrator)")
    s.add_argument("--vision-cuda-graphs", choices=["auto", "off"],
                   help="replay vision serving steps from CUDA graphs (default auto: on a GPU)")
    s.add_argument("--demo", action=argparse.BooleanOptionalAction, help="the Gradio demos at /demo "
                   "(default on; --no-demo or RT_DEMO=0: off)")
    s.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    s.set_defaults(func=_serve)

    c = sub.add_parser("client", help="say a text while streaming a wav as the microphone; save the reply")
    c.add_argument("--url", default="ws://127.0.0.1:8000/v1/realtime")
    c.add_argument("--say", required=True, help="the text the server should speak")
    c.add_argument("--listen", help="a 16-bit PCM wav streamed in real time as microphone audio")
    c.add_argument("--output", default="reply.wav", help="where to save what the server said (24 kHz wav)")
    c.add_argument("--api-key")
    c.add_argument("--timeout", type=float, default=120.0)
    c.add_argument("--max-output-tokens", type=int, help="at most this many speech frames (40 ms each)")
    c.set_defaults(func=_client)

    args = p.parse_args(argv)
    from websockets.exceptions import WebSocketException

    try:
        return args.func(args)
    except (ValueError, RuntimeError, OSError, WebSocketException, TimeoutError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
