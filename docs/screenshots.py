"""Take the docs' screenshots of the Prefect and MLflow UIs from a tiny run (a developer tool, not part of the package).

    PYTHONPATH=. python docs/screenshots.py [--out docs/img] [--keep DIR] [--form-only | --deployments]

What it runs, all on 127.0.0.1 in a temporary folder:
1. `prefect server start` (temporary PREFECT_HOME, sqlite) and `layermoe serve --plan tiny.yaml`: a tiny Qwen2 base,
   synthetic en/es/hu/tr corpora, the registry a sqlite MLflow store. Screenshot: add-languages' custom-run form; its
   whole height and how often it shows Prefect's `Property is type "None"` are printed. `--form-only` stops here.
2. A run of the `lifelong-expansion` deployment (one round adding hu) to Completed. Screenshot: the round's run, Artifacts tab.
3. A run of `add-languages` adding tr with `promotion: manual`, which pauses for review. Screenshots: its Resume form
   as it opens (Reject | Approve buttons, Reject shown first with its Reason empty), and after pressing Reject with
   no reason and submitting (refused); Submit untouched is refused too. The form's text at each step is printed,
   and the run must still be paused.
   Then `layermoe approve RUN_ID --no --reason ...` answers it.
4. `mlflow server` on the same sqlite store. Screenshots: the registered model's versions, and version 3's page.

`--deployments` runs only this instead, against a fresh server: prefect-setup's pools, `prefect deploy --all` from
prefect.yaml and the compose worker's command; the tiny base registered as champion, and add-languages/cpu's default plan
set to a one-round plan adding hu. Screenshots: its Parameters tab; "+ Schedule" filled in with an interval; its runs
once the schedule ticked twice (a round, then "nothing to do", checked through the API); what Run -> Quick run opens, then
its Run pressed; the Custom run form, then that form submitted as drawn (the default plan file); both runs must end Completed.

Chromium (headless) is driven through its DevTools protocol, so a page is captured once it has rendered and the
Resume button can be clicked; each PNG is then quantised with pngquant when it is installed.
"""

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import websockets
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WIDTH, HEIGHT = 1400, 2000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(command, env=env, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def wait_for(condition, what: str, timeout: float = 900.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if result := condition():
                return result
        except OSError:
            pass
        time.sleep(2)
    raise TimeoutError(what)


def http_json(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST" if data else "GET")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"null")


class Browser:
    """Headless Chromium over the DevTools protocol: open a URL, wait for text, click, capture."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.process = subprocess.Popen(
            [
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--remote-debugging-port={self.port}",
                f"--window-size={WIDTH},{HEIGHT}",
                f"--user-data-dir={workdir / 'chromium'}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        targets = wait_for(lambda: http_json(f"http://127.0.0.1:{self.port}/json/list"), "chromium", 60)
        self.ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")

    async def _call(self, ws, method: str, **params):
        self._id = getattr(self, "_id", 0) + 1
        await ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            message = json.loads(await ws.recv())
            if message.get("id") == self._id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    async def _shoot(
        self,
        url: str,
        out: Path,
        wait_text: list[str],
        clicks: list[str],
        settle_s: float,
        script: str | None,
        height: int,
        after: str | None = None,
    ) -> Any:
        async with websockets.connect(self.ws_url, max_size=64 * 2**20) as ws:
            await self._call(ws, "Emulation.setDeviceMetricsOverride", width=WIDTH, height=height, deviceScaleFactor=1, mobile=False)
            await self._call(ws, "Page.navigate", url=url)
            for text in wait_text:
                await self._wait_text(ws, text)
            if script:
                await asyncio.sleep(2)
                await self._call(ws, "Runtime.evaluate", expression=script)
            for label in clicks:  # a button or tab by its visible text: the innermost element showing exactly that text
                script = (
                    "(() => { const els = [...document.querySelectorAll('body *')]"
                    f".filter(e => e.innerText && e.innerText.trim() === {json.dumps(label)});"
                    " const el = els[els.length - 1]; if (el) { el.click(); return true; } return false; })()"
                )
                clicked = False
                for _ in range(60):
                    clicked = (await self._call(ws, "Runtime.evaluate", expression=script, returnByValue=True))["result"]["value"]
                    if clicked:
                        break
                    await asyncio.sleep(1)
                if not clicked:
                    raise RuntimeError(f"no {label!r} to click on {url}")
                await asyncio.sleep(2)
            await asyncio.sleep(settle_s)
            value = None
            if after:  # read (or act on) the page as it is captured
                found = await self._call(ws, "Runtime.evaluate", expression=after, returnByValue=True, awaitPromise=True)
                value = found["result"].get("value")
            shot = await self._call(ws, "Page.captureScreenshot", format="png")
            out.write_bytes(base64.b64decode(shot["data"]))
            return value

    async def _measure(self, url: str, wait_text: list[str], script: str) -> Any:
        async with websockets.connect(self.ws_url, max_size=64 * 2**20) as ws:
            await self._call(ws, "Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False)
            await self._call(ws, "Page.navigate", url=url)
            for text in wait_text:
                await self._wait_text(ws, text)
            await asyncio.sleep(3)
            return (await self._call(ws, "Runtime.evaluate", expression=script, returnByValue=True))["result"]["value"]

    def measure(self, url: str, wait_text: list[str], script: str) -> Any:
        """The value of `script` on the rendered page."""
        return asyncio.run(self._measure(url, list(wait_text), script))

    async def _wait_text(self, ws, text: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = await self._call(
                ws,
                "Runtime.evaluate",
                expression=f"document.body && document.body.innerText.includes({json.dumps(text)})",
                returnByValue=True,
            )
            if found["result"].get("value"):
                return
            await asyncio.sleep(1)
        print(f"warning: text {text!r} never appeared; capturing the page as it is", flush=True)

    def shoot(
        self,
        url: str,
        out: Path,
        wait_text: list[str] = (),
        clicks: list[str] = (),
        settle_s: float = 3.0,
        script: str | None = None,
        height: int = HEIGHT,
        keep: tuple[int | None, int | None] = (None, None),
        after: str | None = None,
    ) -> Any:
        """Capture `url` after the clicks; returns the value of the script `after`, run just before the capture (else the path)."""
        value = asyncio.run(self._shoot(url, out, list(wait_text), list(clicks), settle_s, script, height, after))
        crop(out, *keep)
        if shutil.which("pngquant"):
            subprocess.run(["pngquant", "--force", "--skip-if-larger", "--quality", "60-90", "--output", str(out), str(out)], check=False)
        print(f"{out}: {out.stat().st_size // 1024} KB", flush=True)
        return out if after is None else value

    def close(self) -> None:
        stop(self.process)


FORM_HEIGHT = """(() => {  // the page's full height: the document's, or a scrolling panel's where that is taller
  let height = document.documentElement.scrollHeight;
  for (const e of document.querySelectorAll('*')) if (e.scrollHeight > e.clientHeight + 10) height = Math.max(height, e.scrollHeight);
  return [height, (document.body.innerText.match(/Property is type/g) || []).length];
})()"""
DIALOG = """(() => { const d = document.querySelector('[role=dialog]') || document.querySelector('.p-modal');
  return d ? d.innerText : '(no dialog) ' + document.body.innerText.slice(0, 2000); })()"""
# The Resume form's Decision is one button per answer, Reject first; press Reject, leave Reason empty, and submit.
CHOOSE_REJECT_AND_SUBMIT = """(async () => {
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  const dialog = document.querySelector('[role=dialog]') || document.querySelector('.p-modal') || document;
  const button = t => [...dialog.querySelectorAll('button')].filter(e => e.innerText.trim() === t).pop();
  button('Reject').click();
  await sleep(1000);
  const chosen = dialog.innerText;
  button('Submit').click();
  await sleep(3000);
  return 'chosen:\\n' + chosen + '\\n---after Submit:\\n' + dialog.innerText;
})()"""
MLFLOW_PAGE_WIDTH = 1035  # MLflow 3's UI opens an "MLflow Assistant" panel right of the page: crop it off


def crop(path: Path, width: int | None, height: int | None) -> None:
    """Cut the capture to the part with content (PIL comes with matplotlib)."""
    from PIL import Image

    with Image.open(path) as image:
        box = (0, 0, min(width or image.width, image.width), min(height or image.height, image.height))
        image.crop(box).save(path)


def tiny_world(root: Path) -> Path:
    """A tiny Qwen2 base, synthetic corpora and a lifelong plan adding hu to it; returns the plan file."""
    sys.path.insert(0, str(REPO))
    from tests.conftest import tiny_model
    from tests.synthetic_corpus import write_synthetic_corpus
    from tests.tiny_tokenizer import tiny_tokenizer

    tiny_model("qwen2").save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    corpora = write_synthetic_corpus(root / "corpus", ["en", "es", "hu", "tr"], documents=400)
    fast = dict(learning_rate=3e-3, per_device_batch_size=8, logging_steps=2, save_steps=50)
    plan = {
        "name": "tiny",
        "parent": {"hf_path": str(root / "base"), "languages": ["en", "es"]},
        "rounds": [{"new_languages": ["hu"]}],
        "corpora": {lang: {"path": str(spec.path)} for lang, spec in corpora.items()},
        "allocation": {"delta": 2, "clamp_similarity": 0.001},
        "classifier_layer_count": 1,
        "tokens": {"seq_len": 32, "analysis_tokens": 1000, "stage1_tokens": 4000, "stage2_tokens": 1000, "eval_tokens": 1000},
        "stage1": {**fast, "num_epochs": 1},
        "stage2": {**fast, "num_epochs": 1},
        "evaluation": {"batch_size": 8, "gates": {"max_old_loss_increase": 10.0, "require_new_improvement": False}},
        "registry": {"tracking_uri": f"sqlite:///{root}/mlflow.db", "registered_model_name": "tiny"},
        "workdir": str(root / "work"),
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    parser.add_argument("--form-only", action="store_true", help="take and measure the run form, then stop")
    parser.add_argument(
        "--deployments", action="store_true", help="only prefect.yaml's deployments on a worker, a schedule added in the UI"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    root = args.keep or Path(tempfile.mkdtemp(prefix="layermoe-screens-"))
    root.mkdir(parents=True, exist_ok=True)
    plan_file = tiny_world(root)

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    env.update(
        PREFECT_HOME=str(root / "prefect"),
        PYTHONPATH=str(REPO),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="true",
        MLFLOW_DISABLE_TELEMETRY="true",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    if args.deployments:
        try:
            deployment_screens(args.out, root, plan_file, env)
        finally:
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
        return
    port = free_port()
    ui, api = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/api"
    server_env = {**env, "PREFECT_UI_API_URL": api}  # the UI's pages call the API here, not at the default port 4200
    processes = [
        start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], server_env, root / "server.log")
    ]
    browser = None
    try:
        wait_for(lambda: urllib.request.urlopen(f"{api}/health", timeout=5).status == 200, "the Prefect server")
        env["PREFECT_API_URL"] = api
        processes.append(start([str(BIN / "layermoe"), "serve", "--plan", str(plan_file)], env, root / "serve.log"))

        def deployment(name: str) -> dict:
            return wait_for(lambda: http_json(f"{api}/deployments/name/{name}"), f"deployment {name}")

        add, lifelong = deployment("add-languages/tiny"), deployment("lifelong-expansion/tiny")
        browser = Browser(root)
        browser.shoot(
            f"{ui}/deployments/deployment/{add['id']}/run", args.out / "prefect-run-form.png", wait_text=["Parent model", "New languages"]
        )
        form_url = f"{ui}/deployments/deployment/{add['id']}/run"
        height, none_count = browser.measure(form_url, ["Parent model", "New languages"], FORM_HEIGHT)
        print(f"run form: {height} px tall at {WIDTH} px wide; 'Property is type \"None\"' {none_count} times", flush=True)
        browser.shoot(form_url, root / "prefect-run-form-whole.png", wait_text=["Parent model", "New languages"], height=height)  # to read
        if args.form_only:
            return

        def finished(run_id: str, want: str) -> dict:
            return wait_for(
                lambda: (run := http_json(f"{api}/flow_runs/{run_id}"))["state"]["type"] in (want, "FAILED", "CRASHED") and run,
                f"flow run {run_id} {want}",
            )

        run = http_json(f"{api}/deployments/{lifelong['id']}/create_flow_run", {})
        assert finished(run["id"], "COMPLETED")["state"]["type"] == "COMPLETED", (root / "serve.log").read_text()[-3000:]
        (round_run,) = http_json(f"{api}/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [run["id"]]}}})
        browser.shoot(
            f"{ui}/runs/flow-run/{round_run['id']}",
            args.out / "prefect-round-artifacts.png",
            wait_text=["Completed"],
            clicks=["Artifacts"],
            keep=(None, 1360),
        )

        manual = {
            **add["parameters"]["plan"],
            "new_languages": ["tr"],
            "promotion": "manual",
            "old_languages": [],
            "parent": {"alias": "champion", "version": None, "hf_path": None, "languages": []},
        }
        paused = http_json(f"{api}/deployments/{add['id']}/create_flow_run", {"parameters": {"plan": manual}})
        assert finished(paused["id"], "PAUSED")["state"]["type"] == "PAUSED", (root / "serve.log").read_text()[-3000:]
        review_page = f"{ui}/runs/flow-run/{paused['id']}"
        form = browser.shoot(review_page, args.out / "prefect-review-resume.png", wait_text=["Paused"], clicks=["Resume"], after=DIALOG)
        print(f"the Resume form as it opens:\n{form}\n", flush=True)
        # Submit untouched: Reject is the button shown first, without a reason, so the server refuses it and the run stays paused.
        untouched = browser.shoot(
            review_page, root / "prefect-review-untouched.png", wait_text=["Paused"], clicks=["Resume", "Submit"], after=DIALOG
        )
        print(f"Submit with nothing chosen:\n{untouched}\n", flush=True)
        # Reject without a reason: refused the same way.
        rejected = browser.shoot(
            review_page,
            args.out / "prefect-review-reject-without-reason.png",
            wait_text=["Paused"],
            clicks=["Resume"],
            after=CHOOSE_REJECT_AND_SUBMIT,
            settle_s=1,
        )
        print(f"reject without a reason: {rejected}", flush=True)
        state = http_json(f"{api}/flow_runs/{paused['id']}")["state"]["type"]
        print(f"after both refusals the run is {state}", flush=True)
        assert state == "PAUSED", state
        subprocess.run([str(BIN / "layermoe"), "approve", paused["id"], "--no", "--reason", "tr samples read badly"], env=env, check=True)
        finished(paused["id"], "COMPLETED")

        mlflow_port = free_port()
        mlflow_ui = f"http://127.0.0.1:{mlflow_port}"
        processes.append(
            start(
                [
                    str(BIN / "mlflow"),
                    "server",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(mlflow_port),
                    "--backend-store-uri",
                    f"sqlite:///{root}/mlflow.db",
                    "--default-artifact-root",
                    str(root / "artifacts"),
                ],
                env,
                root / "mlflow.log",
            )
        )
        wait_for(lambda: urllib.request.urlopen(f"{mlflow_ui}/health", timeout=5).status == 200, "the MLflow server")
        browser.shoot(
            f"{mlflow_ui}/#/models/tiny", args.out / "mlflow-versions.png", wait_text=["Version 3"], keep=(MLFLOW_PAGE_WIDTH, 1760)
        )
        browser.shoot(
            f"{mlflow_ui}/#/models/tiny/versions/3",
            args.out / "mlflow-version.png",
            wait_text=["Round 2: adds tr"],
            keep=(MLFLOW_PAGE_WIDTH, 1560),
        )
    finally:
        if browser:
            browser.close()
        for process in reversed(processes):
            stop(process)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


# `--deployments`: prefect.yaml's deployments on a process worker, and a schedule added in the UI.


def deployment_world(root: Path, plan_file: Path) -> Path:
    """The tiny base registered as champion, and a one-round plan adding hu to the champion; returns that plan file."""
    from flows.plan import ParentRef, load_lifelong_plan
    from registry.register import register_base
    from registry.versions import promote

    lifelong = load_lifelong_plan(plan_file)
    promote(lifelong.registry, register_base(lifelong.registry, lifelong.parent.hf_path, lifelong.parent.languages).version)
    one_round = lifelong.round_plan(0, [], ParentRef(alias="champion")).model_dump(mode="json", exclude={"old_languages"})
    path = root / "add-languages.yaml"
    path.write_text(yaml.safe_dump(one_round, sort_keys=False))
    return path


def deployed_stack(root: Path, env: dict, processes: list[subprocess.Popen]) -> tuple[str, str]:
    """A Prefect server, prefect-setup's pools, `prefect deploy --all` and the compose worker's command; returns (UI, API)."""
    port = free_port()
    ui, api = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/api"
    server = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    processes.append(start(server, {**env, "PREFECT_UI_API_URL": api}, root / "server.log"))
    wait_for(lambda: urllib.request.urlopen(f"{api}/health", timeout=5).status == 200, "the Prefect server")
    env["PREFECT_API_URL"] = api
    subprocess.run([sys.executable, str(REPO / "docker" / "prefect" / "setup_server.py")], env=env, check=True)
    with (root / "deploy.log").open("w") as log:
        subprocess.run(
            [str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True
        )
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    worker = [str(BIN / "prefect") if word == "prefect" else word for word in compose["services"]["worker"]["command"]]
    worker_env = {**env, "PREFECT_HOME": str(root / "worker-home"), "PREFECT_WORKER_QUERY_SECONDS": "2"}
    processes.append(
        subprocess.Popen(
            worker, env=worker_env, cwd=root, stdout=(root / "worker.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True
        )
    )
    return ui, api


# The deployment page's "+ Schedule" dialog: an interval of SCHEDULE_S seconds, typed into its fields; saved when SAVE is true.
ADD_INTERVAL_SCHEDULE = """(async () => {
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  const byText = (t, root = document) => [...root.querySelectorAll('*')].filter(e => e.innerText && e.innerText.trim() === t).pop();
  byText('Schedule').click();
  await sleep(2000);
  const dialog = document.querySelector('[role=dialog]') || document.querySelector('.p-modal');
  const value = dialog.querySelector('input[type=number]');
  Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set.call(value, 'SCHEDULE_S');
  value.dispatchEvent(new Event('input', {bubbles: true}));
  const unit = [...dialog.querySelectorAll('select')].find(s => [...s.options].some(o => o.text === 'Seconds'));
  unit.value = [...unit.options].find(o => o.text === 'Seconds').value;
  unit.dispatchEvent(new Event('change', {bubbles: true}));
  await sleep(1000);
  if (!SAVE) return dialog.innerText.split('Timezone')[0];
  byText('Save', dialog).click();
  await sleep(3000);
  return document.body.innerText.split('Schedules')[1].split('Status')[0];
})()"""
# The custom-run page as drawn: the text of its Parameters and the plan-file paths its fields hold, then Submit.
SUBMIT_AS_DRAWN = """(async () => {
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  const byText = t => [...document.querySelectorAll('body *')].filter(e => e.innerText && e.innerText.trim() === t).pop();
  const shown = document.body.innerText.split('Parameters')[1].split('Submit')[0];
  const path = [...document.querySelectorAll('input, textarea')].map(i => i.value).filter(v => v.includes('.yaml'));
  byText('Submit').click(); await sleep(4000);
  return {shown, path, after: location.href};
})()"""
SCHEDULE_S = 20  # longer than a tiny round's start-up, so the ticks are seen one after another


def deployment_screens(out: Path, root: Path, plan_file: Path, env: dict) -> None:
    """prefect.yaml's add-languages/cpu on a process worker: its page, a schedule added in the UI, its runs, its custom run."""
    plan = deployment_world(root, plan_file)
    processes: list[subprocess.Popen] = []
    browser = None
    try:
        ui, api = deployed_stack(root, env, processes)
        deployment = http_json(f"{api}/deployments/name/add-languages/cpu")
        page = f"{ui}/deployments/deployment/{deployment['id']}"
        browser = Browser(root)
        parameters = browser.shoot(
            page,
            out / "prefect-deployment-parameters.png",
            wait_text=["Entrypoint"],
            clicks=["Parameters"],
            keep=(None, 700),
            after="document.body.innerText.split('Key')[1].split('Schedules')[0]",
        )
        print(f"Parameters tab as deployed:\n{parameters}", flush=True)
        assert "/inputs/add-languages.yaml" in parameters, parameters
        # The default names the plan inside a compose worker (/inputs); here it is set to the tiny plan, as the test does.
        request = urllib.request.Request(
            f"{api}/deployments/{deployment['id']}",
            json.dumps({"parameters": {"plan": str(plan)}}).encode(),
            headers={"Content-Type": "application/json"},
            method="PATCH",
        )
        urllib.request.urlopen(request, timeout=30).close()

        add_schedule = ADD_INTERVAL_SCHEDULE.replace("SCHEDULE_S", str(SCHEDULE_S))
        form = browser.shoot(
            page,
            out / "prefect-deployment-add-schedule.png",
            wait_text=["Entrypoint"],
            height=1300,
            after=add_schedule.replace("SAVE", "false"),
        )
        print(f"Add schedule, filled in:\n{form}", flush=True)
        saved = browser.shoot(
            page, root / "prefect-deployment-saved.png", wait_text=["Entrypoint"], after=add_schedule.replace("SAVE", "true")
        )
        print(f"Schedules after Save: {saved!r}", flush=True)
        (schedule,) = http_json(f"{api}/deployments/{deployment['id']}")["schedules"]
        print(f"the schedule on the server: {schedule['schedule']}, parameters {schedule['parameters']}", flush=True)

        def finished_runs() -> list[dict]:
            query = {"flow_runs": {"state": {"type": {"any_": ["COMPLETED", "FAILED", "CRASHED", "CANCELLED"]}}}, "sort": "START_TIME_ASC"}
            return http_json(f"{api}/flow_runs/filter", query)

        done = wait_for(lambda: (runs := finished_runs()) and len(runs) >= 2 and runs, "two finished ticks")
        for run in done:
            print(f"tick {run['name']}: {run['state']['name']} {run['state']['message']!r}, parameters {run['parameters']}", flush=True)
        assert [run["state"]["type"] for run in done] == ["COMPLETED"] * len(done), done
        assert "nothing to do" in done[-1]["state"]["message"], done[-1]["state"]
        scheduled = http_json(f"{api}/flow_runs/count", {"flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}})
        print(f"runs the schedule has waiting: {scheduled}", flush=True)
        browser.shoot(page, out / "prefect-deployment-scheduled-runs.png", wait_text=["Entrypoint", "Completed"], keep=(None, 1100))
        request = urllib.request.Request(
            f"{api}/deployments/{deployment['id']}/schedules/{schedule['id']}",
            json.dumps({"active": False}).encode(),
            headers={"Content-Type": "application/json"},
            method="PATCH",
        )
        urllib.request.urlopen(request, timeout=30).close()
        scheduled = http_json(f"{api}/flow_runs/count", {"flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}})
        print(f"runs waiting once the schedule is off: {scheduled}", flush=True)

        quick = browser.shoot(
            page,
            out / "prefect-deployment-quick-run.png",
            wait_text=["Entrypoint"],
            clicks=["Run", "Quick run"],
            keep=(None, 1100),
            settle_s=1,
            after="(document.querySelector('[role=dialog]') || document.body).innerText.slice(0, 300)",
        )
        print(f"Run -> Quick run opens:\n{quick}", flush=True)
        browser.shoot(
            page, root / "prefect-deployment-quick-run-submitted.png", wait_text=["Entrypoint"], clicks=["Run", "Quick run", "Run"]
        )
        custom = browser.shoot(
            f"{page}/run",
            out / "prefect-deployment-custom-run.png",
            wait_text=["Plan file"],
            keep=(None, 1100),
            after="document.body.innerText.split('Parameters')[1].slice(0, 600)",
        )
        print(f"Custom run form:\n{custom}", flush=True)
        submitted = browser.shoot(
            f"{page}/run", root / "prefect-deployment-custom-run-submitted.png", wait_text=["Plan file"], after=SUBMIT_AS_DRAWN
        )
        print(
            f"Custom run as drawn:\n{submitted['shown']}\npath fields: {submitted['path']}\nafter Submit: {submitted['after']}", flush=True
        )
        by_hand = wait_for(
            lambda: len(runs := [run for run in finished_runs() if not run["auto_scheduled"]]) >= 2 and runs, "the two runs by hand"
        )
        for run in by_hand:
            print(
                f"run by hand {run['name']}: {run['state']['name']} {run['state']['message']!r}, parameters {run['parameters']}", flush=True
            )
        assert [run["state"]["type"] for run in by_hand] == ["COMPLETED"] * len(by_hand), by_hand
    finally:
        if browser:
            browser.close()
        for process in reversed(processes):
            stop(process)


if __name__ == "__main__":
    main()
