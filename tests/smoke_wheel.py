"""Smoke test of the built wheel in a fresh venv (run by `make smoke`, not by pytest).

It must import the installed package, not the source tree, so it is run from
another directory.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import pathlib
import subprocess
import sys
import tempfile
import urllib.request

import deepmode_async
from deepmode_async.testing import MockDeepMode


def main() -> None:
    package_dir = pathlib.Path(deepmode_async.__file__).parent
    assert "site-packages" in str(package_dir), f"not the installed wheel: {package_dir}"
    assert (package_dir / "py.typed").is_file(), "py.typed is missing from the wheel"
    plugins = importlib.metadata.entry_points(group="pytest11")
    assert any(ep.value == "deepmode_async.testing._plugin" for ep in plugins), "no pytest plugin"

    # The thread-backed mock, called with the standard library.
    with MockDeepMode(balance=42) as mock:
        request = urllib.request.Request(  # noqa: S310 (an http URL on loopback)
            f"{mock.base_url}/api/check-balance",
            headers={"Authorization": f"Bearer {mock.api_key}"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            assert json.load(response) == {"remaining_balance": 42}

        # The installed `deepmode` command.
        command = pathlib.Path(sys.executable).with_name("deepmode")
        options = ["--base-url", mock.base_url, "--api-key", mock.api_key, "--json"]
        done = subprocess.run(  # noqa: S603 (our own entry point)
            [str(command), "balance", *options], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"remaining_balance": 42}

    # The async form on this loop, driven by the installed AsyncClient.
    async def async_form() -> None:
        async with MockDeepMode() as mock:
            model = mock.add_model()
            async with deepmode_async.AsyncClient(mock.api_key, base_url=mock.base_url) as dm:
                generation = await dm.images.generate(model_id=model.id, prompt="smoke")
                with tempfile.TemporaryDirectory() as out:
                    (path,) = await dm.images.download(generation, out)
                    assert path.read_bytes() == mock.image_bytes
                assert (await dm.account.balance()).remaining_balance == mock.balance

    asyncio.run(async_form())
    version = deepmode_async.__version__
    print(f"wheel smoke test passed: deepmode_async {version} from {package_dir}")


if __name__ == "__main__":
    main()
