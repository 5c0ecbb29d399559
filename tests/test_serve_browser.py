"""The web chat page of python -m serve, end to end in headless Chromium (Debian's `chromium`, driven
by Playwright with the system browser; `.ci/run` installs it): the greeting streams in, history
carries over, Clear forgets it, Stop keeps what was written and frees the server's row."""

import json
import os
import shutil

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
    page = browser.new_page(viewport={"width": 1000, "height": 700})
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
    assert ask(page, "你好") == trained_answer("你好")
    seen = [text for text in page.evaluate("window.seen") if text]
    assert len(set(seen)) > 2 and all(trained_answer("你好").startswith(text) for text in seen), seen
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
    assert page.sent[-1]["messages"][:2] == [{"role": "user", "content": "你好"}, {"role": "assistant", "content": partial}]
