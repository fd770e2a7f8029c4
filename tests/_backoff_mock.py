"""The mock for the shared back-off's cross-process test, in a process of its own:

    python tests/_backoff_mock.py --rate-limited P --retry-after S [mock options]

serves as `python -m deepmode_async.testing` does, with `chaos` answering a share `P`
of the balance calls 429 with `Retry-After: S`; on its way out it writes to stderr how
many calls it answered 429 and how many it served, as `answered: {"429": N, ...}`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys

from deepmode_async._mock_options import add_mock_options
from deepmode_async.testing import MockDeepMode
from deepmode_async.testing.__main__ import serve


def main() -> None:
    parser = argparse.ArgumentParser()
    add_mock_options(parser)
    parser.add_argument("--rate-limited", type=float, required=True)
    parser.add_argument("--retry-after", type=float, required=True)
    options = parser.parse_args()
    mock = MockDeepMode(api_key=options.api_key, latency=options.latency, port=options.port)
    mock.chaos("balance", rate_limited=options.rate_limited, retry_after=options.retry_after)
    asyncio.run(serve(mock))
    answered = collections.Counter(str(request.status) for request in mock.requests)
    print(f"answered: {json.dumps(answered)}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
