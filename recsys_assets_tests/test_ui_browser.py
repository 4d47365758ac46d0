"""The Dagster UI as the user sees it: a real `dagster-webserver` on the code location, opened in headless
Chromium (Debian's `chromium`, installed by scripts/install_browser.sh, driven by Playwright through
`executable_path`: no browser download).

- every asset of `recsys_assets.definitions.defs` (read at test time: the graph grows) is listed in the asset
  catalog, with a screenshot saved as a test artifact;
- a PNG embedded in markdown metadata (`plots.image_markdown`, how two_tower_model shows its training curves)
  renders as an image on the asset's page;
- every asset carries a description, a known group, kinds and a `stage` tag (no browser needed).

Screenshots go to $RECSYS_TEST_ARTIFACTS (default: test-artifacts/ in the repository, git-ignored).
The server runs in its own process group, killed at the end."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiprocess  # a dagster-webserver and a headless browser

REPO = Path(__file__).resolve().parents[1]
GROUPS = {"data", "retrieval", "ranking", "evaluation", "serving"}
PROBE_ASSET = "ui_probe_training_curves"
SERVER_START_TIMEOUT_S = 60
PAGE_TIMEOUT_MS = 30_000


def _artifacts_dir() -> Path:
    d = Path(os.environ.get("RECSYS_TEST_ARTIFACTS") or REPO / "test-artifacts")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no chromium on PATH and scripts/install_browser.sh could not install it (needs apt-get and root)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _asset_names() -> list[str]:
    from recsys_assets.definitions import defs

    return sorted(k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys())


# ---------------------------------------------------------------------------------------------- readability
def test_every_asset_is_described_grouped_and_kinded():
    from recsys_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    problems = []
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        name = key.to_user_string()
        if not (node.description or "").strip():
            problems.append(f"{name}: no description")
        if node.group_name not in GROUPS:
            problems.append(f"{name}: group {node.group_name!r} not in {sorted(GROUPS)}")
        if not node.kinds:
            problems.append(f"{name}: no kinds")
        if not node.tags.get("stage"):
            problems.append(f"{name}: no 'stage' tag")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------- the server
PROBE_CODE = f'''
"""A one-asset code location for the UI test: markdown metadata with an embedded PNG."""
import tempfile
from pathlib import Path

import dagster as dg

from recsys_assets.evaluation.plots import image_markdown, training_curves_png



@dg.asset(group_name="evaluation", kinds={{"python"}}, tags={{"stage": "test"}}, description="UI test probe.")
def {PROBE_ASSET}() -> dg.MaterializeResult:
    history = [{{"epoch": e, "loss": 3.0 - e, "metrics": {{"hr@10": 0.1 * (e + 1), "ndcg@10": 0.05 * (e + 1)}}}}
               for e in range(3)]
    png = training_curves_png(history, Path(tempfile.mkdtemp()) / "training_curves.png", "probe")
    return dg.MaterializeResult(metadata={{"training_curves": dg.MetadataValue.md(image_markdown(png, "probe curves"))}})


defs = dg.Definitions(assets=[{PROBE_ASSET}])
'''


def _graphql(port: int, query: str) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def _wait_for_locations(port: int, proc: subprocess.Popen, log: Path) -> None:
    query = """{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus
                locationOrLoadError { __typename ... on PythonError { message } } } } } }"""
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"dagster-webserver exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            entries = _graphql(port, query)["data"]["workspaceOrError"]["locationEntries"]
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = exc
            time.sleep(0.5)
            continue
        last = entries
        if entries and all(e["loadStatus"] == "LOADED" for e in entries):
            errors = [e for e in entries if e["locationOrLoadError"]["__typename"] == "PythonError"]
            assert not errors, f"code location failed to load: {errors}"
            return
        time.sleep(0.5)
    pytest.fail(f"code locations not loaded after {SERVER_START_TIMEOUT_S}s (last: {last}):\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def webserver(tmp_path_factory):
    """`dagster-webserver` (no daemon: faster than `dagster dev`) on a free loopback port, a temporary
    DAGSTER_HOME with one materialization of the probe asset; yields the base URL."""
    tmp = tmp_path_factory.mktemp("ui")
    home = tmp / "dagster_home"
    home.mkdir()
    probe = tmp / "ui_probe.py"
    probe.write_text(PROBE_CODE)
    (tmp / "workspace.yaml").write_text(
        textwrap.dedent(f"""\
        load_from:
          - python_module: {{module_name: recsys_assets.definitions, location_name: recsys_assets}}
          - python_file: {{relative_path: {probe}, location_name: ui_probe}}
        """)
    )
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "RECSYS_STATE_DIR": str(tmp / "state"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
        "PYTHONPATH": str(REPO),
    }
    # One materialization of the probe in that instance (in a child: this process's DAGSTER_HOME stays as is).
    done = subprocess.run(
        [sys.executable, "-m", "dagster", "asset", "materialize", "-f", str(probe), "--select", PROBE_ASSET],
        env=env,
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"materializing the probe failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    port = _free_port()
    log = tmp / "webserver.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "dagster-webserver"),
                "-w",
                str(tmp / "workspace.yaml"),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
            ],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_for_locations(port, proc, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


@pytest.fixture(scope="module")
def browser():
    executable = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright python package is not installed")
    with sync_playwright() as pw:
        b = pw.chromium.launch(
            executable_path=executable, headless=True, args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"]
        )
        try:
            yield b
        finally:
            b.close()


def _dismiss_community_dialog(page) -> None:
    """A fresh instance greets with a "Join the Dagster community" dialog over the page: skip it."""
    skip = page.get_by_role("button", name="Skip")
    try:
        skip.wait_for(state="visible", timeout=3000)
        skip.click()
    except Exception:  # noqa: BLE001 - not shown (this browser already skipped it)
        pass


def _wait_for_asset_links(page, names: list[str], timeout_s: float) -> list[str]:
    """Waits until the page has a visible row linking to /assets/<name> for every name; returns the missing ones
    (links, not text: "interactions" is also a substring of "raw_interactions")."""
    deadline = time.monotonic() + timeout_s
    missing = names
    while time.monotonic() < deadline:
        shown = set(
            page.eval_on_selector_all(
                "a[href]",
                "els => els.filter(e => e.offsetParent !== null && e.innerText.trim())"
                ".map(e => decodeURIComponent(new URL(e.href).pathname) + '|' + e.innerText.trim().split('\\n')[0])",
            )
        )
        missing = [n for n in names if f"/assets/{n}|{n}" not in shown]
        if not missing:
            return []
        time.sleep(0.5)
    return missing


# ---------------------------------------------------------------------------------------------- browser tests
def test_asset_catalog_lists_every_asset(browser, webserver):
    names = _asset_names()
    page = browser.new_page(viewport={"width": 1600, "height": 1400})
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    # The catalog is a table with one row per asset: unlike the lineage graph it shows every name as text.
    page.goto(f"{webserver}/assets", wait_until="domcontentloaded")
    missing = _wait_for_asset_links(page, names, 40)
    _dismiss_community_dialog(page)
    try:  # let the status column fill in before the screenshot (cosmetic, not asserted)
        page.get_by_text("Loading...").first.wait_for(state="detached", timeout=10_000)
    except Exception:  # noqa: BLE001
        pass
    shot = _artifacts_dir() / "ui_asset_catalog.png"
    page.screenshot(path=str(shot), full_page=True)
    assert not missing, f"assets not shown in the catalog ({shot}): {missing}"
    # The lineage view of the whole graph, for humans (nodes may be virtualized, so no assertion on it).
    page.goto(f"{webserver}/asset-groups", wait_until="domcontentloaded")
    _dismiss_community_dialog(page)
    page.wait_for_timeout(2000)
    page.screenshot(path=str(_artifacts_dir() / "ui_asset_lineage.png"), full_page=True)
    page.close()


def test_lineage_shows_the_source_files_upstream_of_raw_interactions(browser, webserver):
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    # raw_interactions' upstream lineage: a graph of two nodes, the observable source and the asset itself
    page.goto(f"{webserver}/assets/raw_interactions?view=lineage&lineageScope=upstream", wait_until="domcontentloaded")
    _dismiss_community_dialog(page)
    source = page.get_by_text("interaction_source", exact=True).first
    source.wait_for(state="visible")
    page.screenshot(path=str(_artifacts_dir() / "ui_source_lineage.png"), full_page=True)
    assert page.get_by_text("raw_interactions", exact=True).count() >= 1
    page.close()


def test_markdown_metadata_renders_embedded_png(browser, webserver):
    page = browser.new_page(viewport={"width": 1600, "height": 1400})
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    page.goto(f"{webserver}/assets/{PROBE_ASSET}", wait_until="domcontentloaded")
    _dismiss_community_dialog(page)
    # Markdown metadata sits behind "[Show Markdown]" in the metadata table; it opens in a dialog.
    page.get_by_text("[Show Markdown]").first.click()
    img = page.locator('img[src^="data:image/png;base64,"]').first
    img.wait_for(state="visible")
    width = page.evaluate("(el) => el.naturalWidth", img.element_handle())
    page.screenshot(path=str(_artifacts_dir() / "ui_markdown_image.png"), full_page=True)
    assert width == 600, f"embedded PNG did not decode (naturalWidth={width})"
    page.close()
