"""One-shot set-up of a Prefect server for layermoe (compose service `prefect-setup`; the tests run it too).

- The work pools that prefect.yaml deploys to, `layermoe` and `layermoe-gpu`, so `prefect deploy --all`
  succeeds on the default stack; runs on `layermoe-gpu` wait until the GPU worker is up.
- An automation that marks a flow run Crashed when its heartbeats stop (its process was killed, or its
  machine went away), as Prefect's guide to zombie flow runs does. Workers send a heartbeat every
  PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (docker-compose.yml sets 30); SILENCE_S without one ends the run.

Idempotent: what exists already is left as it is. Needs only Prefect and PREFECT_API_URL.
"""

import asyncio
import os
from datetime import timedelta

from prefect import get_client
from prefect.automations import Automation
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification
from prefect.exceptions import ObjectAlreadyExists

POOLS = ("layermoe", "layermoe-gpu")
AUTOMATION = "layermoe: crash runs whose heartbeats stopped"
SILENCE_S = int(os.environ.get("LAYERMOE_CRASH_AFTER_SILENT_S", "90"))  # three missed heartbeats at 30 s


async def create_pools_and_automation() -> None:
    async with get_client() as client:
        for name in POOLS:
            try:
                await client.create_work_pool(WorkPoolCreate(name=name, type="process"))
                print(f"work pool {name!r} created")
            except ObjectAlreadyExists:
                print(f"work pool {name!r} exists")
        if await client.read_automations_by_name(AUTOMATION):
            print(f"automation {AUTOMATION!r} exists")
            return
    await crash_automation().acreate()
    print(f"automation {AUTOMATION!r} created")


def crash_automation() -> Automation:
    return Automation(
        name=AUTOMATION,
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=SILENCE_S),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {SILENCE_S} s: the run's process is gone. Trigger the run again to resume from its checkpoints.",
            )
        ],
    )


if __name__ == "__main__":
    asyncio.run(create_pools_and_automation())
