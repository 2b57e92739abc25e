"""Run in the compose project's client container: wait for the ML service by name, send one CLIP /predict
the way the Immich server does (multipart: `entries` JSON, then `image` or `text`), print the JSON answer.

    python3 predict_client.py URL ENTRIES_JSON (--text TEXT | --image PATH)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp

_READY_TIMEOUT_S = 120


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("entries")
    parser.add_argument("--text")
    parser.add_argument("--image")
    args = parser.parse_args()
    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while True:  # /health answers 200 once the preloaded models are warm
            try:
                async with session.get(f"{args.url}/health") as response:
                    if response.status == 200:
                        break
            except aiohttp.ClientConnectionError:
                pass  # the name resolves once the service's container is up; it listens a moment later
            if time.monotonic() > deadline:
                raise SystemExit(f"{args.url} not ready after {_READY_TIMEOUT_S} s")
            await asyncio.sleep(0.2)
        form = aiohttp.FormData()
        form.add_field("entries", args.entries)
        if args.image:
            with open(args.image, "rb") as image:
                form.add_field("image", image.read(), filename="blob", content_type="application/octet-stream")
        else:
            form.add_field("text", args.text)
        async with session.post(f"{args.url}/predict", data=form) as response:
            print(json.dumps({"status": response.status, "body": await response.json()}))


asyncio.run(main())
