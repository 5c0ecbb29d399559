"""The web chat page of python -m serve, end to end in headless Chromium (Debian's `chromium`, driven
by Playwright with the system browser; `.ci/run` installs it): the greeting streams in, history
carries over, Clear forgets it, Stop keeps what was written and frees the server's row, and answers
render as Markdown while they stream, with model text never run as script or markup."""

import json
import os
import shutil
import urllib.request

import pytest

from serve.process import ServerProcess
from test_cli_demo import trained_answer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs the system chromium (apt-get install chromium; .ci/run does)")
# Where to leave a screenshot of the page for a person to look at (optional).
SCREENSHOT = os.environ.get("SERVE_SCREENSHOT")


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--threads", "1") as running:
        yield running
    assert "Traceback" not in running.log, running.log


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking"],
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    # Playwright's wait_for_function evaluates strings, which the page's policy forbids; without the
    # policy, the tests also show that the renderer alone keeps model text from running.
    page = browser.new_page(viewport={"width": 1000, "height": 700}, bypass_csp=True)
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent === 'tiny-chatglm2'")
    page.fill("#temperature", "0")  # greedy: the trained answers
    # Record every text the newest answer shows, to see it grow while it streams.
    page.evaluate(
        """() => {
            window.seen = [];
            new MutationObserver(() => {
                const answers = document.querySelectorAll('.message.assistant');
                if (answers.length) window.seen.push(answers[answers.length - 1].firstChild?.textContent || '');
            }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
        }"""
    )
    sent = []
    page.on("request", lambda request: sent.append(json.loads(request.post_data)) if request.method == "POST" else None)
    page.sent = sent
    yield page
    page.close()


def ask(page, text):
    """Type `text`, press Enter, wait for the answer to finish; return its text."""
    before = page.locator(".message.assistant").count()
    page.fill("#input", text)
    page.press("#input", "Enter")
    answer = page.locator(".message.assistant").nth(before)
    answer.and_(page.locator("[data-done=true]")).wait_for(timeout=120_000)
    return answer.evaluate("node => node.firstChild ? node.firstChild.textContent : ''")


def test_the_greeting_streams_in_and_clear_starts_over(page, tmp_path):
    # The page renders once per read of the stream, and a fast server can finish the answer before the first read:
    # reads of at most 64 bytes (splitting events and characters, as a network may) make every step observable.
    page.evaluate(
        """() => {
            const read = ReadableStreamDefaultReader.prototype.read;
            ReadableStreamDefaultReader.prototype.read = async function () {
                if (!this.rest || !this.rest.length) {
                    const result = await read.call(this);
                    if (result.done) return result;
                    this.rest = result.value;
                }
                const piece = this.rest.slice(0, 64);
                this.rest = this.rest.slice(64);
                return {value: piece, done: false};
            };
        }"""
    )
    assert ask(page, "你好") == trained_answer("你好")
    seen = [text for text in page.evaluate("window.seen") if text]
    # Shown growing: parts of the answer before the whole, each a beginning of it.
    assert set(seen) - {trained_answer("你好")} and all(trained_answer("你好").startswith(text) for text in seen), seen
    page.screenshot(path=SCREENSHOT or str(tmp_path / "chat.png"))

    assert ask(page, "My name is Bob.") == trained_answer("My name is Bob.")
    assert ask(page, "What is my name?") == trained_answer("My name is Bob.", "What is my name?")
    assert [message["role"] for message in page.sent[-1]["messages"]] == ["user", "assistant", "user", "assistant", "user"]

    page.click("#clear")
    assert page.locator(".message").count() == 0
    assert ask(page, "What is my name?") == trained_answer("What is my name?")
    assert page.sent[-1]["messages"] == [{"role": "user", "content": "What is my name?"}]
    assert page.sent[-1]["temperature"] == 0 and page.sent[-1]["stream"] is True


def test_stop_keeps_the_partial_answer_and_frees_the_row(page, server):
    before = server.health()["cancelled_rows"]

    # Make this answer long: the page's request gets vLLM's min_tokens on the way out.
    def lengthen(route):
        body = json.loads(route.request.post_data)
        route.continue_(post_data=json.dumps({**body, "max_tokens": 1000, "min_tokens": 1000}))

    page.route("**/v1/chat/completions", lengthen)
    page.fill("#input", "你好")
    page.press("#input", "Enter")
    answer = page.locator(".message.assistant").last
    page.wait_for_function("document.querySelector('.message.assistant').firstChild?.textContent.length > 3")
    assert page.is_enabled("#stop") and page.is_disabled("#send")
    page.click("#stop")
    answer.and_(page.locator("[data-done=true]")).wait_for(timeout=30_000)
    assert "(stopped)" in answer.inner_text()
    partial = answer.evaluate("node => node.firstChild.textContent")
    assert partial and page.is_enabled("#send")
    page.wait_for_function(
        f"fetch('/health').then(r => r.json()).then(h => h.cancelled_rows > {before} && h.running_rows === 0)", timeout=60_000, polling=300
    )
    page.unroute("**/v1/chat/completions")
    ask(page, "Hello")
    kept = page.sent[-1]["messages"][:2]
    assert kept[0] == {"role": "user", "content": "你好"} and kept[1]["role"] == "assistant"
    # What the history keeps is the text the page showed (rendered as Markdown, as it was shown).
    assert page.evaluate(RENDERED_TEXT, kept[1]["content"]) == partial


RENDERED_TEXT = "text => { const box = document.createElement('div'); box.append(Markdown.render(text)); return box.textContent; }"
CODE = "print('<b>hi</b>')\nx = 1 < 2"
SCRIPTED_ANSWER = f"""Here is **the code**:

```python
{CODE}
```

- item one
- item `two`

| Tool | Use |
|---|---|
| `ls` | list |

<script>window.pwned = 1</script>
<img src="/track.png" onerror="window.pwned = 2">
[click](javascript:window.pwned=3) and [docs](https://example.org/a_b)
![tracker](/track.png)
"""

# The page's fetch of the answer, answered by a stream that sends `window.scriptedEvents` one every
# 20 ms, as the server streams (Playwright's route would hand the page the whole body at once).
SCRIPTED_FETCH = """events => {
    const realFetch = window.fetch;
    window.fetch = (url, options) => {
        if (!String(url).endsWith('/v1/chat/completions')) return realFetch(url, options);
        const encoder = new TextEncoder();
        const body = new ReadableStream({async pull(controller) {
            if (!events.length) { controller.close(); return; }
            await new Promise(resolve => setTimeout(resolve, 20));
            controller.enqueue(encoder.encode(events.shift()));
        }});
        return Promise.resolve(new Response(body, {status: 200, headers: {'Content-Type': 'text/event-stream'}}));
    };
    window.renders = [];
    new MutationObserver(() => {
        const answer = document.querySelector('.message.assistant:last-of-type');
        if (answer) window.renders.push({streaming: answer.classList.contains('streaming'), code: answer.querySelector('pre > code')?.textContent ?? null});
    }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
}"""


def test_a_markdown_answer_renders_while_streaming_and_never_runs_model_text(page, server, tmp_path):
    pieces = [SCRIPTED_ANSWER[start : start + 6] for start in range(0, len(SCRIPTED_ANSWER), 6)]
    events = [f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': piece}, 'finish_reason': None}]})}\n\n" for piece in pieces]
    events += [f"data: {json.dumps({'choices': [{'index': 0, 'delta': {}, 'finish_reason': 'stop'}]})}\n\n", "data: [DONE]\n\n"]
    requested = []
    page.on("request", lambda request: requested.append(request.url))
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    page.evaluate(SCRIPTED_FETCH, events)
    ask(page, "Show me some code")
    answer = page.locator(".message.assistant").last

    # Markdown became elements: a code block as <pre><code>, a list, a table, inline code and strong.
    assert answer.locator("pre > code").all_text_contents() == [CODE]
    assert answer.locator("ul > li").all_text_contents() == ["item one", "item two"]
    assert answer.locator("li code").all_text_contents() == ["two"]
    assert answer.locator("th").all_text_contents() == ["Tool", "Use"] and answer.locator("td").all_text_contents() == ["ls", "list"]
    assert answer.locator("p strong").all_text_contents() == ["the code"]
    # The code block streamed in as it was written, not only once the answer was whole.
    renders = page.evaluate("window.renders")
    partial_code = {render["code"] for render in renders if render["streaming"] and render["code"] is not None}
    assert partial_code and any(code != CODE and CODE.startswith(code) for code in partial_code), partial_code

    # Model text is text: nothing ran, no on* attribute, no script or image element, nothing loaded.
    assert page.evaluate("typeof window.pwned") == "undefined"
    attributes = page.evaluate("[...document.querySelectorAll('#messages *')].flatMap(node => [...node.attributes].map(a => a.name))")
    assert not [name for name in attributes if name.lower().startswith("on")], attributes
    assert page.locator("#messages script, #messages img, #messages iframe").count() == 0
    assert "<script>window.pwned = 1</script>" in answer.inner_text() and 'onerror="window.pwned = 2"' in answer.inner_text()
    assert [link.get_attribute("href") for link in answer.locator("a").all()] == ["https://example.org/a_b"]
    assert "[click](javascript:window.pwned=3)" in answer.inner_text()
    assert not [url for url in requested if "track.png" in url], requested

    # The code block's Copy button puts the code itself on the clipboard.
    answer.locator(".code-block button").click()
    page.wait_for_function("document.querySelector('.code-block button').textContent === 'Copied'")
    assert page.evaluate("navigator.clipboard.readText()") == CODE
    page.screenshot(path=os.environ.get("SERVE_MARKDOWN_SCREENSHOT") or str(tmp_path / "markdown.png"))


def test_the_page_runs_only_its_own_scripts(server):
    with urllib.request.urlopen(server.url + "/") as response:
        policy = response.headers["Content-Security-Policy"]
        page = response.read().decode("utf-8")
    assert "script-src 'self'" in policy and "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert "<script>" not in page and "https://" not in page  # no inline script, nothing from elsewhere
