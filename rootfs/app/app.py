"""Minimal Flask app served by the microvm guest (see rootfs/README.md).

The guest init (microvm-init) starts it as the image's Cmd,
`python3 /app/app.py`, when no command is given to the VM.
"""
import os

from flask import Flask

app = Flask(__name__)


@app.route("/")
def hello():
    return "Hello, World!"


if __name__ == "__main__":
    # One console line that shows the image's WorkingDir and Env reached us.
    print(
        f"app: starting in {os.getcwd()}, APP_MESSAGE={os.environ.get('APP_MESSAGE', '')}",
        flush=True,
    )
    # Flask's development server; threaded by default.
    app.run(host="0.0.0.0", port=80)
