"""The main job: an emulated 2-device cluster serving the default model, answering one prompt over HTTP.

Usage: .venv/bin/python scripts/demo.py MODEL_DIR [PROMPT]
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request


def main() -> int:
    model = sys.argv[1]
    prompt = sys.argv[2] if len(sys.argv) > 2 else "The edge is"
    cmd = [sys.executable, "-m", "edge_llm", "cluster", "--model", model, "--workers", "2", "--port", "0"]
    print("$ edge-llm", " ".join(cmd[3:]), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            print(line.rstrip(), flush=True)
            if m := re.search(r"on (http://\S+)", line):
                url = m[1]
        if url is None:
            print("the cluster did not start", file=sys.stderr)
            return 1
        body = {"prompt": prompt, "max_tokens": 24, "temperature": 0}
        print(f"$ curl {url}/v1/completions -d '{json.dumps(body)}'", flush=True)
        req = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            answer = json.load(resp)
        print(json.dumps(answer, indent=2, ensure_ascii=False))
        return 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


if __name__ == "__main__":
    raise SystemExit(main())
