"""The main job: an emulated 2-device cluster serving the default model, answering one chat question over HTTP.

Usage: .venv/bin/python scripts/demo.py MODEL_DIR [QUESTION]
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request


def _wait_for_url(proc: subprocess.Popen) -> str | None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            return None
        print(line.rstrip(), flush=True)
        if m := re.search(r"on (http://\S+)", line):
            return m[1]
    return None


def main() -> int:
    model = sys.argv[1]
    question = sys.argv[2] if len(sys.argv) > 2 else "Why is the sky blue? Answer in two sentences."
    cmd = [sys.executable, "-m", "edge_llm", "cluster", "--model", model, "--workers", "2", "--port", "0"]
    print("$ edge-llm", " ".join(cmd[3:]), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = _wait_for_url(proc)
        if url is None:
            print("the cluster did not start", file=sys.stderr)
            return 1
        body = {"messages": [{"role": "user", "content": question}], "max_tokens": 160, "temperature": 0}
        print(f"$ curl {url}/v1/chat/completions -d '{json.dumps(body)}'", flush=True)
        req = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        began = time.monotonic()
        with urllib.request.urlopen(req, timeout=300) as resp:
            answer = json.load(resp)
        took = time.monotonic() - began
        print(json.dumps(answer, indent=2, ensure_ascii=False))
        usage = answer.get("usage", {})
        print(f"\n{answer['choices'][0]['message']['content']}\n\n({usage.get('completion_tokens')} tokens "
              f"in {took:.1f} s on 2 emulated devices)")
        return 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


if __name__ == "__main__":
    raise SystemExit(main())
