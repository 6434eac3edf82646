"""Python's `websockets` (which offers permessage-deflate by default and compresses what it sends,
keeping its context) against a node: joins a room, publishes COUNT messages of mixed sizes with
short pauses, and checks every payload it receives. Prints one JSON line.
Usage: python3 websockets-deflate.py URL ROOM COUNT"""
import asyncio
import json
import sys

from websockets.asyncio.client import connect


def data(i):
    size = 20 + i % 50 if i % 3 == 0 else 2000 + (i * 37) % 6000
    pad = ""
    while len(pad) < size:
        pad += f"row {i % 13}, price {len(pad) % 97}; "
    return {"i": i, "pad": pad[:size]}


async def main(url, room, count):
    async with connect(url, open_timeout=20) as ws:
        extensions = ws.response.headers.get("Sec-WebSocket-Extensions")
        await ws.send(json.dumps({"op": "join", "room": room, "id": 1}))
        while json.loads(await ws.recv()).get("id") != 1:
            pass

        async def publish():
            for i in range(count):
                await ws.send(json.dumps({"op": "pub", "room": room, "data": data(i), "id": i + 2}))
                if i % 20 == 19:
                    await asyncio.sleep(0.01)

        sender = asyncio.create_task(publish())
        received, bad = 0, 0
        while received < count:
            v = json.loads(await asyncio.wait_for(ws.recv(), 30))
            if v.get("op") == "error":
                bad += 1
            if v.get("op") != "msg":
                continue
            if v["data"] != data(received):
                bad += 1
            received += 1
        await sender
        print(json.dumps({"extensions": extensions, "received": received, "bad": bad}))


asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
