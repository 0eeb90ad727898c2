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
    p.add_argument("--retries", type=int, default=3,
                   help="resend a 500/502/503/504 or a refused connection this many times (backoff, Retry-After)")
    p.set_defaults(func=main)


def load_dialog(path: str) -> dict:
    try:
        body = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SystemExit(f"{path}: cannot read the dialog JSON ({err})") from None
    if not isinstance(body, dict):
        raise SystemExit(f"{path}: expected a JSON object with 'context' and 'current'")
    return body


def main(args: argparse.Namespace) -> int:
    from dialclip_ray.serving.client import retrieve

    body = load_dialog(args.dialog)
    for key, value in (("k", args.k), ("target", args.target)):
        if value is not None:
            body[key] = value
    if args.allow_partial:
        body["allow_partial"] = True
    url = args.url.rstrip("/") + "/v1/retrieve"
    answer = retrieve(url, body, args.timeout, retries=max(0, args.retries))
    status, out = answer.status, answer.body
    if status == 0:
        print(f"error: {out['error']} (after {answer.attempts} attempts)", file=sys.stderr)
        return 2
    if status != 200:
        print(f"error {status}: {out.get('error', out)}"
              + (f" (after {answer.attempts} attempts)" if answer.attempts > 1 else ""), file=sys.stderr)
        return 1
    print(f"{len(out['hits'])} hits in {out['took_ms']:.1f} ms" +
          (f" (PARTIAL: missing {', '.join(out['missing_shards'])})" if out["partial"] else ""))
    for h in out["hits"]:
        meta = h["metadata"]
        what = meta.get("path") or meta.get("text") or json.dumps(meta)
        print(f"{h['rank']:>3}  {h['score']:+.4f}  {h['id']}  {what[:80]}")
    return 0
