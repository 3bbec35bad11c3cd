"""Minimal Flask app served by the microvm guest (see rootfs/README.md).

The guest init (/sbin/init) starts it with `python3 /app/app.py` when no
`microvm.cmd=` is given on the kernel command line.
"""
from flask import Flask

app = Flask(__name__)


@app.route("/")
def hello():
    return "Hello, World!"


if __name__ == "__main__":
    # Flask's development server; threaded by default.
    app.run(host="0.0.0.0", port=80)
