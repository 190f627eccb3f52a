"""Style Adapter Studio in the browser: ``python app.py``, then open http://127.0.0.1:7860.

Importing this module does nothing: no network, no model loading, no file reading.
"""

import argparse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train, mix and export style LoRAs in the browser.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--base", default="demo:sd15", help="base model preselected on the Train tab")
    p.add_argument("--outputs", default="outputs", help="run folders; the only folder the server serves files from")
    p.add_argument("--models", default="models", help="folder scanned for local base models")
    p.add_argument("--loras", default="loras", help="folder of extra .safetensors LoRAs for the Mix tab")
    p.add_argument("--auth", default=None, help="user:password (or set STYLE_STUDIO_AUTH)")
    p.add_argument("--share", action="store_true", help="create a public gradio.live link (off by default)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from ui.app import launch  # imported here so that `import app` stays free of side effects

    launch(args)


if __name__ == "__main__":
    main()
