"""The mock DeepMode API end to end, driven with raw aiohttp (what `make demo` runs).

It starts `MockDeepMode` on loopback, trains a model from sample photos, receives the
training callback, generates a batch of images concurrently, downloads them into
./deepmode-demo and prints what happened. No key and no network needed.
"""

from __future__ import annotations

import asyncio
import pathlib
import time
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from deepmode_async.testing import MockDeepMode, sample_image

OUT = pathlib.Path("deepmode-demo")
PROMPTS = [
    f"portrait of me as {role}" for role in ("an astronaut", "a chef", "a knight", "a pilot")
]


async def main() -> None:
    trained: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    async def on_callback(request: web.Request) -> web.Response:
        trained.set_result(await request.json())
        return web.Response()

    receiver = web.Application()
    receiver.router.add_post("/trained", on_callback)
    runner = web.AppRunner(receiver, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    callback_url = f"http://127.0.0.1:{runner.addresses[0][1]}/trained"

    started = time.perf_counter()
    async with (
        MockDeepMode(training_delay=0.5, latency={"generate": 0.3}) as mock,
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {mock.api_key}"}) as api,
        aiohttp.ClientSession() as blobs,  # the image host must never see the API key
    ):
        print(f"mock API at {mock.base_url}, images at {mock.blob_base_url}")
        start_balance = mock.balance

        form = aiohttp.FormData()
        for index in range(5):
            form.add_field("images", sample_image(), filename=f"me-{index}.jpg")
        for name, value in {
            "gender": "woman",
            "model_type": "amateur",
            "callback": callback_url,
        }.items():
            form.add_field(name, value)
        async with api.post(f"{mock.base_url}/api/models", data=form) as response:
            print(f"create model: {response.status} {await response.json()}")
        model = await asyncio.wait_for(trained, timeout=10)
        print(f"training callback after {time.perf_counter() - started:.2f}s: model {model['id']}")

        async def generate(prompt: str) -> list[dict[str, Any]]:
            body = {"model_id": model["id"], "prompt": prompt, "num_images": 2}
            async with api.post(f"{mock.base_url}/api/images/generate", json=body) as response:
                response.raise_for_status()
                images: list[dict[str, Any]] = (await response.json())["images"]
                return images

        batch_started = time.perf_counter()
        batches = await asyncio.gather(*(generate(prompt) for prompt in PROMPTS))
        images = [image for batch in batches for image in batch]
        print(
            f"generated {len(images)} images from {len(PROMPTS)} prompts concurrently "
            f"in {time.perf_counter() - batch_started:.2f}s"
        )

        await asyncio.to_thread(OUT.mkdir, exist_ok=True)
        for image in images:
            # Signed URLs go out byte for byte: re-encoding the query breaks the signature.
            async with blobs.get(URL(image["image_url"], encoded=True)) as response:
                response.raise_for_status()
                data = await response.read()
            await asyncio.to_thread((OUT / image["file_name"]).write_bytes, data)
        print(f"downloaded {len(images)} images into {OUT}/")
        print(
            f"credits spent: {start_balance - mock.balance} "
            f"({', '.join(f'{c.endpoint} {c.cost}' for c in mock.ledger[:2])}, ...)"
        )
        print(
            f"requests seen by the mock: {len(mock.requests)}; "
            f"total {time.perf_counter() - started:.2f}s"
        )
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
