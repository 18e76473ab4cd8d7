"""openpi's own client against a policy server: run with .venv-openpi/bin/python (`make openpi-client`), which holds
openpi-client 0.1.2 and its numpy<2; tests/test_serve.py runs it against `flywheel serve`.

    .venv-openpi/bin/python tests/openpi_client_check.py --port 8000 [--api-key KEY] [--observations FILE.npz]
        [--prompt TEXT] [--drop KEY]

FILE.npz holds ``images`` uint8 (N, H, W, C), ``states`` float32 (N, P) and optionally ``noise`` float32 (N, C, A);
without it, one observation of zeros shaped as the server's metadata says. ``--drop KEY`` leaves that field out of
every observation. Prints one JSON object: {"ok", "metadata", "replies": [{"shape", "dtype", "actions",
"server_timing"}]} or, where the client raised, {"ok": false, "error": "Type: message"}.
"""

import argparse
import json
import sys

import numpy as np
from openpi_client.websocket_client_policy import WebsocketClientPolicy


def observations(args, metadata):
    if args.observations:
        data = np.load(args.observations)
        noise = data["noise"] if "noise" in data.files else None
        for i in range(len(data["images"])):
            obs = {"observation/image": data["images"][i], "observation/state": data["states"][i],
                   "prompt": args.prompt}
            if noise is not None:
                obs["noise"] = noise[i]
            yield obs
        return
    h, w, c = metadata["image_shape"]
    yield {"observation/image": np.zeros((h, w, c), np.uint8),
           "observation/state": np.zeros(metadata["state_dim"], np.float32), "prompt": args.prompt}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--api-key")
    parser.add_argument("--observations")
    parser.add_argument("--prompt", default="push the red block onto the blue pad")
    parser.add_argument("--drop")
    args = parser.parse_args()
    out = {"ok": False}
    try:
        client = WebsocketClientPolicy(args.host, args.port, api_key=args.api_key)
        out["metadata"] = client.get_server_metadata()
        out["replies"] = []
        for obs in observations(args, out["metadata"]):
            obs.pop(args.drop, None)
            reply = client.infer(obs)
            actions = reply["actions"]
            out["replies"].append({"shape": list(actions.shape), "dtype": str(actions.dtype),
                                   "actions": actions.tolist(), "server_timing": reply.get("server_timing")})
        out["ok"] = True
    except Exception as e:  # noqa: BLE001 (reported to the test)
        out["error"] = f"{type(e).__name__}: {e}"
    print(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
