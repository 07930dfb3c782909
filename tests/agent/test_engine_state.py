"""The engine's state and events as the agent reports them, from a real dockerd."""

from __future__ import annotations

import asyncio
import time

from dao.agent.engine_state import disk_use, follow, snapshot
from dao.channel.frames import decode, encode
from dao.engine import Engine
from tests.services import images
from tests.services.dockerd import Dockerd


async def test_snapshot_and_events_name_a_container(dockerd: Dockerd, tmp_path) -> None:
    image = dockerd.docker("import", str(images.busybox_layer(tmp_path).path), "agent-state:1").stdout.strip()
    since = time.time() - 1
    cid = dockerd.docker("create", "--name", "agent-state", image, "true").stdout.strip()
    async with Engine(f"unix://{dockerd.sock}") as engine:
        await engine.negotiate()
        state = await snapshot(engine)
        assert decode(encode(state)) == state  # it travels as one frame
        mine = [c for c in state.containers if c["id"] == cid]
        assert mine and mine[0]["name"] == "agent-state" and mine[0]["state"] == "created"
        assert any(i["id"] == image and i["tags"] == ["agent-state:1"] for i in state.images)
        assert state.disk["images"] > 0
        dockerd.docker("rm", cid)
        seen = []
        async with asyncio.timeout(30):
            async for frame in follow(engine, since):
                seen.append(frame.event)
                if frame.event["action"] == "destroy" and frame.event["id"] == cid:
                    break
    created = [e for e in seen if e["id"] == cid and e["action"] == "create"]
    assert created and created[0]["type"] == "container" and created[0]["name"] == "agent-state"
    assert created[0]["image"] == image and created[0]["time"] >= since


def test_disk_use_sums_system_df_by_kind() -> None:
    df = {
        "LayersSize": 1000,
        "Containers": [{"SizeRw": 10}, {"SizeRw": None}, {}],
        "Volumes": [{"UsageData": {"Size": 7}}, {"UsageData": {"Size": -1}}, {}],  # -1: not computed
        "BuildCache": [{"Size": 5}, {"Size": 6}],
    }
    assert disk_use(df) == {"images": 1000, "containers": 10, "volumes": 7, "build_cache": 11}
    assert disk_use({}) == {"images": 0, "containers": 0, "volumes": 0, "build_cache": 0}
