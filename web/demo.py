"""The Gradio demos at ``/demo``: vision, 3D and voice tabs, each a client of the server's public API.

Mounted on the server's own ASGI app (``create_app`` with ``Settings.demo``; on by default for
``python -m realtime serve``). The handlers never touch the engine or a model: they call the server back
over loopback — ``/v1/models`` and ``/v1/chat/completions`` over HTTP (web/demo_api.py), ``/v1/realtime``
over a websocket — with the API key typed in the page, so the demo sees exactly what any client sees:
the same keys, per-key limits and error messages. Every event handler has an ``api_name``, so
``gradio_client`` can drive the demo (tests/test_web_demo.py).
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: never phone home

from typing import Any  # noqa: E402

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402

from web import demo_points as points  # noqa: E402
from web.demo_api import ApiError, frame_ms, list_models, speak, stream_chat  # noqa: E402

WIRE_RATE = 24000  # the realtime API's audio rate
NOT_SERVED_3D = "3D questions need the 3D model: not served by this server."
NOT_A_3D_MODEL = "This model does not take point clouds: pick a 3D model in the list."
NOT_SERVED_VISION = ("The vision API is not served by this server (`/v1/models` answers 404; it was started with "
                     "`--vision-model none`): the Vision and 3D tabs cannot answer.")


def self_url(host: str, port: int) -> str:
    """Where the demo reaches the server it is mounted on: its bind address, loopback for a wildcard."""
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _error(e: ApiError) -> str:
    return f"**Error:** {e.message}  \n`HTTP {e.status or '-'}` · `{e.code}`"


def _usage_note(usage: dict[str, Any], finish: str | None) -> str:
    parts = []
    if usage:
        parts.append(f"{usage.get('prompt_tokens', '?')} prompt tokens, {usage.get('completion_tokens', '?')} "
                     "answer tokens")
    if finish:
        parts.append("stopped at the token limit" if finish == "length" else f"finished: {finish}")
    kept, total = usage.get("spatial_tokens_kept"), usage.get("spatial_tokens_total")
    if kept is not None:
        share = f" ({100 * kept / total:.0f}%)" if total else ""
        parts.append(f"**spatial tokens kept: {kept} of {total if total is not None else '?'}{share}**")
    return " · ".join(parts)


def _models_note(models: list[dict[str, Any]]) -> str:
    if not models:
        return "The server lists no models."
    names = [(f"`{m['id']}` (base{', 3D' if 'point_cloud' in m.get('input_modalities', ()) else ''})"
              if not m.get("parent") else f"`{m['id']}` (LoRA rank {m.get('rank', '?')})") for m in models]
    return f"{len(models)} model{'s' if len(models) > 1 else ''}: " + ", ".join(names)


def build_demo(base_url: str, ws_url: str | None = None) -> gr.Blocks:
    """The Blocks; ``base_url`` is the server's HTTP address, ``ws_url`` its ``/v1/realtime`` (derived)."""
    ws_url = ws_url or base_url.replace("http", "ws", 1) + "/v1/realtime"

    async def refresh_models(api_key: str, current: str | None, current_3d: str | None):
        try:
            models = await list_models(base_url, api_key)
        except ApiError as e:
            note = NOT_SERVED_VISION if e.status == 404 else _error(e)
            if e.status == 401:
                note += "  \nEnter the server's API key above, then press **Refresh**."
            return gr.Dropdown(choices=[], value=None), gr.Dropdown(choices=[], value=None), note
        ids = [m["id"] for m in models if "point_cloud" not in m.get("input_modalities", ())]
        ids_3d = [m["id"] for m in models if "image" not in m.get("input_modalities", ())]
        pick = current if current in ids else (ids[0] if ids else None)
        pick_3d = current_3d if current_3d in ids_3d else (ids_3d[0] if ids_3d else None)
        return (gr.Dropdown(choices=ids, value=pick), gr.Dropdown(choices=ids_3d, value=pick_3d),
                _models_note(models))

    async def ask_vision(image, model: str | None, question: str, max_tokens: float, api_key: str):
        question = (question or "").strip()
        if not question:
            yield "", "**Type a question.**"
            return
        if not model:
            yield "", "**Pick a model** (press **Refresh** to list the server's models)."
            return
        content: list[dict[str, Any]] = [{"type": "text", "text": question}]
        if image is not None:  # the image first, then the question: the order the default model learned
            content.insert(0, {"type": "image_url", "image_url": {"url": _image_data_url(image)}})
        text = ""
        yield "", "_asking…_"
        try:
            async for a in stream_chat(base_url, api_key, model, content, int(max_tokens)):
                text = a.text
                yield text, _usage_note(a.usage, a.finish_reason) or "_answering…_"
        except ApiError as e:
            yield text, NOT_SERVED_VISION if (e.status == 404 and e.code == "not_found") else _error(e)

    def show_example(name: str):
        cloud = points.example(name or points.EXAMPLES[0])
        note = f"  \nIts questions in the test set: {cloud.note}" if cloud.note else ""
        return None, points.figure(cloud), f"Example **{cloud.name}**: {len(cloud):,} points.{note}"

    def show_upload(path: str | None, name: str):
        if not path:
            return show_example(name)[1:]
        try:
            cloud = points.load(path)
        except (points.PointCloudError, OSError) as e:
            return None, f"**Cannot read this file:** {e}"
        return points.figure(cloud), f"**{cloud.name}**: {len(cloud):,} points."

    async def ask_points(path: str | None, name: str, model: str | None, question: str, max_tokens: float,
                         api_key: str):
        try:
            cloud = points.load(path) if path else points.example(name or points.EXAMPLES[0])
        except (points.PointCloudError, OSError) as e:
            yield "", f"**Cannot read this file:** {e}"
            return
        content = [{"type": "text", "text": (question or "").strip() or "What is this?"},
                   {"type": "point_cloud_url", "point_cloud_url": {"url": points.data_url(cloud)}}]
        text = ""
        yield "", f"_asking about {cloud.name} ({len(cloud):,} points)…_"
        try:
            async for a in stream_chat(base_url, api_key, model or "default", content, int(max_tokens)):
                text = a.text
                yield text, _usage_note(a.usage, a.finish_reason) or "_answering…_"
        except ApiError as e:
            if e.code == "point_clouds_not_supported":
                yield text, f"**{NOT_A_3D_MODEL}**  \n`HTTP {e.status}`: {e.message}"
            else:
                yield text, f"**{NOT_SERVED_3D}**  \n`HTTP {e.status}`: {e.message}" if _is_3d_unserved(e) else _error(e)

    async def voice(text: str, recording, seconds: float, api_key: str):
        text = (text or "").strip()
        if not text:
            return None, "**Type what to say.**"
        listen = _to_wire_audio(recording) if recording is not None else None
        period = await frame_ms(base_url, api_key)
        frames = max(1, round(float(seconds) * 1000 / period))
        heard_s = 0.0 if listen is None else listen.shape[0] / WIRE_RATE
        try:
            r = await speak(ws_url, api_key, text, listen, frames, timeout=60 + 4 * (float(seconds) + heard_s))
        except ApiError as e:
            return None, _error(e)
        secs = r.audio.shape[0] / WIRE_RATE
        what = {"completed": "Completed",
                "incomplete": f"Stopped at the length limit ({float(seconds):g} s)",
                "interrupted": "**Interrupted**: the model heard you barge in and stopped",
                "cancelled": "Cancelled"}.get(r.status or "", f"Ended: {r.status}")
        if r.interrupted_at_ms is not None:
            what += f" after {r.interrupted_at_ms} ms of its answer"
        pcm = (np.clip(r.audio, -1, 1) * 32767).astype(np.int16)
        return ((WIRE_RATE, pcm) if pcm.size else None), f"{what} · {secs:.2f} s of audio · status `{r.status}`"

    with gr.Blocks(title="duplex-server demos", analytics_enabled=False) as demo:
        gr.Markdown("## duplex-server demos\nEach tab is a client of this server's public API "
                    "(`/v1/chat/completions`, `/v1/models`, `/v1/realtime`). The voice chat is at [`/`](/).")
        with gr.Row():
            key = gr.Textbox(label="API key", type="password", scale=3,
                             placeholder="only if the server was started with --api-key")
            refresh = gr.Button("Refresh models", scale=1)
        models_note = gr.Markdown()

        with gr.Tab("Vision"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(type="pil", label="Image", height=280)
                    model = gr.Dropdown(label="Model or adapter", choices=[], allow_custom_value=True)
                    question = gr.Textbox(label="Question", value="What is in this picture?")
                    max_tokens = gr.Slider(1, 512, value=64, step=1, label="Longest answer (tokens)")
                    ask = gr.Button("Ask", variant="primary")
                with gr.Column():
                    answer = gr.Textbox(label="Answer", lines=8, interactive=False)
                    vision_info = gr.Markdown()

        with gr.Tab("3D"):
            gr.Markdown("Point clouds go to `/v1/chat/completions` as a `point_cloud_url` content part (a PLY "
                        "data URL). The 3D model answers short questions about scenes of coloured boxes, "
                        "spheres, cylinders and slabs, like the test scenes below; AdaToken-3D's gate prunes "
                        "the spatial tokens the question hardly reads, and the note under the answer says how "
                        "many it kept.")
            with gr.Row():
                with gr.Column():
                    cloud_file = gr.File(label="Point cloud (.ply, .pcd, .npy)", file_types=[".ply", ".pcd", ".npy"],
                                         type="filepath")
                    example = gr.Dropdown(list(points.EXAMPLES), value=points.EXAMPLES[0], label="…or an example")
                    model_3d = gr.Dropdown(label="Model", choices=[], allow_custom_value=True)
                    question_3d = gr.Textbox(label="Question", value="How many objects are there?")
                    max_tokens_3d = gr.Slider(1, 512, value=64, step=1, label="Longest answer (tokens)")
                    ask_3d = gr.Button("Ask", variant="primary")
                with gr.Column():
                    plot = gr.Plot(label="Point cloud")
                    cloud_info = gr.Markdown()
                    answer_3d = gr.Textbox(label="Answer", lines=4, interactive=False)
                    info_3d = gr.Markdown()

        with gr.Tab("Voice"):
            gr.Markdown("Type a message: the server answers by voice over the realtime websocket. With the "
                        "dialogue brain of `python -m realtime serve` it answers the message; a server without "
                        "one says it back. A recording, if given, streams in real time as the microphone while "
                        "the server speaks: talk over the answer and the model stops by itself (*interrupted*).")
            with gr.Row():
                with gr.Column():
                    say = gr.Textbox(label="Message", value="Hello! What can you do?")
                    recording = gr.Audio(sources=["microphone", "upload"], type="numpy",
                                         label="Microphone audio while it answers (optional)")
                    seconds = gr.Slider(1, 30, value=8, step=1, label="Longest answer (seconds)")
                    speak_btn = gr.Button("Speak", variant="primary")
                with gr.Column():
                    reply = gr.Audio(label="Reply", type="numpy", interactive=False, autoplay=True)
                    voice_info = gr.Markdown()

        model_outputs = [model, model_3d, models_note]
        demo.load(refresh_models, [key, model, model_3d], model_outputs, api_name="models")
        demo.load(show_example, [example], [cloud_file, plot, cloud_info], api_name="initial_points")
        gr.on([refresh.click, key.submit], refresh_models, [key, model, model_3d], model_outputs,
              api_name="refresh_models")
        gr.on([ask.click, question.submit], ask_vision, [image, model, question, max_tokens, key],
              [answer, vision_info], api_name="ask_vision")
        example.change(show_example, [example], [cloud_file, plot, cloud_info], api_name="show_example")
        cloud_file.upload(show_upload, [cloud_file, example], [plot, cloud_info], api_name="show_upload")
        cloud_file.clear(show_upload, [cloud_file, example], [plot, cloud_info], api_name="clear_upload")
        gr.on([ask_3d.click, question_3d.submit], ask_points,
              [cloud_file, example, model_3d, question_3d, max_tokens_3d, key], [answer_3d, info_3d],
              api_name="ask_points")
        gr.on([speak_btn.click, say.submit], voice, [say, recording, seconds, key], [reply, voice_info],
              api_name="speak")
    demo.queue(default_concurrency_limit=4)
    return demo


def mount_demo(app: Any, host: str, port: int, path: str = "/demo") -> gr.Blocks:
    """Mount the demo on ``app`` at ``path``; it calls the server back at ``host:port``. No Node server
    (SSR off), no share link, nothing fetched from outside: fonts are Gradio's local ones."""
    demo = build_demo(self_url(host, port))
    gr.mount_gradio_app(app, demo, path, ssr_mode=False, footer_links=["api", "gradio"], run_history=False,
                        show_error=True, max_file_size="64mb")
    return demo


def _is_3d_unserved(e: ApiError) -> bool:
    """The server has no 3D model: the route is missing (404) or it refuses the content part (400)."""
    if e.status == 404 and e.code == "not_found":
        return True
    return e.status in (400, 404, 501) and ("point_cloud" in e.message or e.code.endswith("_not_supported"))


def _image_data_url(image: Any) -> str:
    """A PIL image → ``data:image/png;base64,...``, at most 1024 px a side (the encoder wants 224)."""
    import base64
    import io

    image = image.convert("RGB")
    image.thumbnail((1024, 1024))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _to_wire_audio(recording: tuple[int, np.ndarray]) -> np.ndarray | None:
    """Gradio's ``(rate, samples)`` (int16 or float, mono or not) → float32 mono at 24 kHz."""
    rate, x = recording
    x = np.asarray(x)
    if x.size == 0:
        return None
    x = x.astype(np.float32) / float(np.iinfo(x.dtype).max + 1) if x.dtype.kind == "i" else x.astype(np.float32)
    if x.ndim == 2:
        x = x.mean(axis=1)
    if rate != WIRE_RATE:
        import torch
        import torchaudio

        x = torchaudio.functional.resample(torch.from_numpy(np.ascontiguousarray(x)), int(rate), WIRE_RATE).numpy()
    return x.astype(np.float32)
