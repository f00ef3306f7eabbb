"""The simulator's HTML report in headless Chromium: it loads from a file with the network
off, logs no console error or exception, shows every view with content, and a real click
on its Route button changes the routing picture (and the step label). A screenshot is
written beside the report. Driven over the DevTools protocol on a pipe (fds 3 and 4).

    report_browser_test.py SWITCHYARD_TOOL WORK_DIR

Exits 77 (CTest: skipped) with the reason when Chromium is not installed.
"""
import base64
import json
import os
import select
import shutil
import subprocess
import sys
import time

TOOL, WORK = sys.argv[1], sys.argv[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
if CHROMIUM is None:
    print("SKIPPED: Chromium is not installed (Debian: apt-get install chromium); the report "
          "was not checked in a browser")
    sys.exit(77)

failures = []


def check(condition, what):
    print(("ok   " if condition else "FAIL ") + what)
    if not condition:
        failures.append(what)


os.makedirs(WORK, exist_ok=True)
config = os.path.join(WORK, "report.toml")
with open(config, "w") as f:
    f.write('[model]\nnum_experts = 32\nhidden = 1024\n[router]\ntop_k = 4\n'
            '[simulate]\nnodes = 4\ngpus_per_node = 4\ntokens_per_rank = 256\nsteps = 3\n'
            'logits = "zipf:0.5"\n')
report = os.path.join(WORK, "report.html")
subprocess.run([TOOL, "simulate", config, "--html", report, "--compare", "policy=topk",
                "policy=node_limited,max_groups=2", "redundant_experts=16"], check=True,
               capture_output=True)


class Browser:
    """Chromium with --remote-debugging-pipe: JSON messages ending in NUL, requests with
    ids, events in between."""

    def __init__(self):
        to_browser_r, self.to_browser = os.pipe()
        self.from_browser, from_browser_w = os.pipe()
        profile = os.path.join(WORK, "chromium-profile")
        self.process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             "--user-data-dir=" + profile, "--no-first-run", "--window-size=1300,1400",
             "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>", "about:blank"],
            # The child's fds 3 and 4 are the pipe's ends, inheritable (dup2 onto itself
            # keeps close-on-exec; closing other fds would run after this and take them).
            close_fds=False,
            preexec_fn=lambda: (os.dup2(to_browser_r, 3), os.dup2(from_browser_w, 4),
                                os.set_inheritable(3, True), os.set_inheritable(4, True)),
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(WORK, "chromium.log"), "w"))
        os.close(to_browser_r)
        os.close(from_browser_w)
        self.buffer = b""
        self.next_id = 0
        self.events = []

    def send(self, method, params=None, session=None, timeout=30):
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            reply = self.receive(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(method + ": " + json.dumps(reply["error"]))
                return reply["result"]
            self.events.append(reply)

    def receive(self, deadline):
        while b"\0" not in self.buffer:
            left = deadline - time.time()
            if left <= 0 or not select.select([self.from_browser], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self.from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the pipe")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def wait_for_event(self, method, session, timeout=30):
        deadline = time.time() + timeout
        while True:
            for e in self.events:
                if e.get("method") == method and e.get("sessionId") == session:
                    self.events.remove(e)
                    return e
            self.events.append(self.receive(deadline))

    def close(self):
        try:
            self.send("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001 - it is going away either way
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


browser = Browser()
try:
    target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Page", "Runtime", "Log"):
        browser.send(domain + ".enable", session=session)
    browser.send("Page.navigate", {"url": "file://" + report}, session=session)
    browser.wait_for_event("Page.loadEventFired", session)

    def evaluate(expression):
        result = browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                              session=session)
        if "exceptionDetails" in result:
            raise RuntimeError("evaluating " + expression + ": " + json.dumps(result["exceptionDetails"]))
        return result["result"].get("value")

    # Every view is there and drawn.
    for view in ("routing-view", "load-view", "slots-view", "heatmap-view", "policies-view",
                 "steps-view"):
        check(evaluate(f"!!document.getElementById('{view}')"), "view " + view + " exists")
    check(evaluate("document.querySelectorAll('#routing .route-line').length") >= 24,
          "the routing picture draws a line per (sampled token, expert)")
    check(evaluate("document.querySelectorAll('#load .load-bar').length") == 32,
          "the load view has one bar per expert")
    check(evaluate("document.querySelectorAll('#policies .policy-bar').length") == 9,
          "three accountings for each of the three router settings")
    check(evaluate("document.querySelectorAll('#policy-table tr').length") == 4,
          "the policy table has a row per setting")
    check(evaluate("document.querySelectorAll('#steps polyline').length") == 3,
          "one imbalance line per setting")
    check(evaluate("document.querySelectorAll('#slots .slot-cell').length") == 32,
          "the slots view: one slot per expert for the contiguous setting")
    check(evaluate("document.querySelectorAll('#slots .rank-load').length") == 16,
          "and a load bar per rank of the EP group")
    # The setting with 16 extra copies: 48 slots, 3 per rank, the first setting's load as
    # an outline beside each rank's.
    evaluate("""(() => { const s = document.getElementById('setting'); s.value = '2';
                 s.dispatchEvent(new Event('change')); })()""")
    check(evaluate("document.querySelectorAll('#slots .slot-cell').length") == 48,
          "the replicated setting draws its 48 slots")
    check(evaluate("document.querySelectorAll('#slots .rank-load-before').length") == 16,
          "with the contiguous load per rank as outlines")
    check("48 slots for 32 experts" in evaluate("document.getElementById('slots-note').textContent"),
          "the slots note counts slots and experts")
    evaluate("""(() => { const s = document.getElementById('setting'); s.value = '0';
                 s.dispatchEvent(new Event('change')); })()""")
    check(evaluate("""(() => { const c = document.getElementById('heatmap');
                       const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                       const seen = new Set();
                       for (let i = 0; i < d.length; i += 4 * 97) seen.add(d[i] + ',' + d[i+1] + ',' + d[i+2]);
                       return seen.size; })()""") > 3, "the heatmap is painted")
    check("imbalance" in evaluate("document.getElementById('load-note').textContent"),
          "the load note says the imbalance")
    check(evaluate("document.getElementById('step-label').textContent") == "step 1 of 3",
          "the first step is shown")

    # A real click (mouse events at the button's centre) shows another step.
    before = evaluate("document.getElementById('routing').innerHTML")
    box = evaluate("""(() => { const r = document.getElementById('route').getBoundingClientRect();
                       return [r.x + r.width / 2, r.y + r.height / 2]; })()""")
    for kind in ("mousePressed", "mouseReleased"):
        browser.send("Input.dispatchMouseEvent", {"type": kind, "x": box[0], "y": box[1],
                                                  "button": "left", "clickCount": 1},
                     session=session)
    after = evaluate("document.getElementById('routing').innerHTML")
    check(before != after, "the Route button changes the routing picture")
    check(evaluate("document.getElementById('step-label').textContent") == "step 2 of 3",
          "and the step label")

    shot = browser.send("Page.captureScreenshot", {"format": "png"}, session=session)["data"]
    screenshot = os.path.join(WORK, "report.png")
    with open(screenshot, "wb") as f:
        f.write(base64.b64decode(shot))
    check(os.path.getsize(screenshot) > 10000, "screenshot written to " + screenshot)

    # Console errors and exceptions, from the load and the click.
    deadline = time.time() + 0.5
    while time.time() < deadline:
        try:
            browser.events.append(browser.receive(deadline))
        except TimeoutError:
            break
    problems = []
    for e in browser.events:
        method, params = e.get("method"), e.get("params", {})
        if method == "Runtime.exceptionThrown":
            problems.append(json.dumps(params["exceptionDetails"])[:300])
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            problems.append(json.dumps(params.get("args"))[:300])
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            problems.append(params["entry"].get("text", "")[:300])
    check(not problems, "no console errors or exceptions" + (": " + "; ".join(problems) if problems else ""))
finally:
    browser.close()

if failures:
    print(f"{len(failures)} check(s) failed")
    sys.exit(1)
print("report_browser_test: all checks passed")
