"""``dialclip query``: send a dialog (JSON file in the /v1/retrieve format) to a running server."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("query", help="retrieve the top-k images/texts for a dialog from `dialclip serve`")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    p.add_argument("--dialog", required=True,
                   help='JSON file: {"context": [{"speaker": 0, "text": "...", "images": [{"id": ...}]}], '
                        '"current": "..."}')
    p.add_argument("--k", type=int, default=None)
    p.add_argument("--target", choices=["image", "text"], default=None)
    p.add_argument("--allow-partial", action="store_true")
    p.add_argument("--timeout", type=float, default=60.0, help="HTTP timeout in seconds")
    p.set_defaults(func=main)


def load_dialog(path: str) -> dict:
    try:
        body = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SystemExit(f"{path}: cannot read the dialog JSON ({err})") from None
    if not isinstance(body, dict):
        raise SystemExit(f"{path}: expected a JSON object with 'context' and 'current'")
    return body


def post_json(url: str, body: dict, timeout: float) -> tuple[int, dict]:
    """(status, JSON answer) with the standard library, so the client needs nothing beyond Python."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, {"error": raw[:500].decode(errors="replace")}


def main(args: argparse.Namespace) -> int:
    import urllib.error

    body = load_dialog(args.dialog)
    for key, value in (("k", args.k), ("target", args.target)):
        if value is not None:
            body[key] = value
    if args.allow_partial:
        body["allow_partial"] = True
    url = args.url.rstrip("/") + "/v1/retrieve"
    try:
        status, out = post_json(url, body, args.timeout)
    except (urllib.error.URLError, OSError) as err:
        print(f"error: cannot reach {url}: {err}", file=sys.stderr)
        return 2
    if status != 200:
        print(f"error {status}: {out.get('error', out)}", file=sys.stderr)
        return 1
    print(f"{len(out['hits'])} hits in {out['took_ms']:.1f} ms" +
          (f" (PARTIAL: missing {', '.join(out['missing_shards'])})" if out["partial"] else ""))
    for h in out["hits"]:
        meta = h["metadata"]
        what = meta.get("path") or meta.get("text") or json.dumps(meta)
        print(f"{h['rank']:>3}  {h['score']:+.4f}  {h['id']}  {what[:80]}")
    return 0
