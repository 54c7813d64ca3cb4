"""The per-transfer-process approach, for comparison: one fresh Python process per transfer that connects,
authorizes and sends one `mt5_deposit`, then waits for its reply (what a cron job or a webhook handler running a
script per transfer does). No ledger: it is the floor of that approach, not a safe transfer.

Usage: python bench/per_process.py WS_URL TOKEN FROM_BINARY TO_MT5 AMOUNT   (the token from argv: bench only)
Exit 0 when the deposit was confirmed.
"""

from __future__ import annotations

import json
import sys

import websocket


def main(url: str, token: str, from_binary: str, to_mt5: str, amount: str) -> int:
    ws = websocket.create_connection(f"{url}?app_id=1089", timeout=10)
    try:
        ws.send(json.dumps({"authorize": token, "req_id": 1}))
        if "error" in json.loads(ws.recv()):
            return 1
        # the amount's text goes on the wire as a JSON number, exactly as given
        ws.send(f'{{"mt5_deposit": 1, "from_binary": "{from_binary}", "to_mt5": "{to_mt5}", '
                f'"amount": {amount}, "req_id": 2}}')
        reply = json.loads(ws.recv())
        return 0 if reply.get("mt5_deposit") == 1 else 1
    finally:
        ws.close()


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:6]))
