"""A real headless browser on the embedded stack's web UIs, as a person uses them.

Shared by ``tests/test_browser.py`` (which asserts what the pages show) and
``scripts/screenshots.py`` (which runs those tests to regenerate ``docs/images/``), so the pages
in the README are exactly the ones the tests checked.

The browser is Debian's ``chromium`` driven through Debian's ``chromium-driver`` with Selenium.
Both paths are given explicitly: Selenium Manager, which otherwise downloads a browser and a
driver at run time, is never started (nothing here reaches the network).

Pages are React apps (Airflow 3) or a React app behind HTTP basic auth (MLflow). They are read
the way a person reads them: by waiting until the visible text says what is expected, never
with fixed sleeps (:func:`tests.stack_testing.wait_for`).
"""

from __future__ import annotations

import base64
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tests.stack_testing import wait_for

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT_DIR_ENV = "RECSYS_SCREENSHOT_DIR"
"""When set, every :meth:`Browser.shot` also writes ``<name>.png`` there (the screenshot
script points it at ``docs/images``); otherwise screenshots go to the test's own folder only."""
WINDOW = (1440, 900)
PAGE_TIMEOUT_S = 60.0


def browser_missing() -> str | None:
    """Why no browser test can run here (``None`` when chromium and its driver are installed);
    ``scripts/setup.sh`` installs both."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]
    if missing:
        return f"{' and '.join(missing)} not installed (apt-get install chromium chromium-driver)"
    return None


@contextmanager
def chromium(download_dir: Path | None = None) -> Iterator[Any]:
    """A headless Chromium (a fresh profile, a desktop-sized window), quit afterwards."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in CI containers
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        "--force-device-scale-factor=1",
        "--lang=en-US",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ):
        options.add_argument(argument)
    if download_dir is not None:
        options.add_experimental_option("prefs", {"download.default_directory": str(download_dir)})
    service = Service(executable_path=str(CHROMEDRIVER))  # never Selenium Manager
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.set_page_load_timeout(PAGE_TIMEOUT_S)
        yield driver
    finally:
        driver.quit()


class Browser:
    """One browser tab with the helpers both UIs need: visible text, waiting for it, clicking
    what a person would click (by its visible text), and screenshots."""

    def __init__(self, driver: Any, shots: Path) -> None:
        self.driver = driver
        self.shots = shots
        self.shots.mkdir(parents=True, exist_ok=True)

    # -- reading -------------------------------------------------------------------------------

    def text(self) -> str:
        """The page's visible text (what a person can read, not hidden markup)."""
        from selenium.common.exceptions import WebDriverException

        try:
            return self.driver.find_element("tag name", "body").text
        except WebDriverException:
            return ""  # between two renders of a React page

    def wait_text(self, *needles: str, timeout_s: float = PAGE_TIMEOUT_S) -> str:
        """The visible text once it contains every one of ``needles``; fails naming them and
        the page it was on, with what that page showed last."""

        def shows() -> str:
            text = self.text()
            return text if all(needle in text for needle in needles) else ""

        try:
            return wait_for(f"{self.driver.current_url} to show {needles}", shows, timeout_s, 0.5)
        except TimeoutError as exc:
            self.shot("failure-" + "-".join(n[:20] for n in needles).replace("/", "_"))
            raise AssertionError(f"{exc}; the page shows:\n{self.text()[:3000]}") from None

    def find(self, css: str, timeout_s: float = PAGE_TIMEOUT_S) -> Any:
        """The first displayed element matching ``css``, once there is one."""

        def displayed() -> Any:
            for element in self.driver.find_elements("css selector", css):
                try:
                    if element.is_displayed():
                        return element
                except Exception:  # stale: React re-rendered it
                    continue
            return None

        return wait_for(f"{css} on {self.driver.current_url}", displayed, timeout_s, 0.25)

    def find_text(self, text: str, tags: str = "*", timeout_s: float = PAGE_TIMEOUT_S) -> Any:
        """A displayed element (of ``tags``, an XPath name test; any: the innermost) whose text
        is ``text``: a button, tab or link found by what it says."""
        literal = _xpath_literal(text)
        innermost = f" and not(.//*[normalize-space(.)={literal}])" if tags == "*" else ""
        xpath = f"//{tags}[normalize-space(.)={literal}{innermost}]"

        def displayed() -> Any:
            for element in self.driver.find_elements("xpath", xpath):
                try:
                    if element.is_displayed():
                        return element
                except Exception:
                    continue
            return None

        return wait_for(f"{text!r} on {self.driver.current_url}", displayed, timeout_s, 0.25)

    def click_text(self, text: str, tags: str = "*", timeout_s: float = PAGE_TIMEOUT_S) -> None:
        element = self.find_text(text, tags, timeout_s)
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
        element.click()

    def type_into(self, element: Any, value: str) -> None:
        """Replace an input's value the way typing does (React sees every keystroke; a plain
        ``clear()`` leaves a controlled input's state unchanged)."""
        from selenium.webdriver.common.keys import Keys

        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
        element.click()
        element.send_keys(Keys.CONTROL, "a")
        element.send_keys(Keys.BACKSPACE)
        element.send_keys(value)

    # -- screenshots ---------------------------------------------------------------------------

    def shot(self, name: str, height: int | None = None) -> Path:
        """Save the window as ``<name>.png`` in the test's folder, and in
        ``$RECSYS_SCREENSHOT_DIR`` when the screenshot script asks for it; ``height`` makes
        the window that tall for this one picture (a long form or table in one image)."""
        path = self.shots / f"{name}.png"
        if height is None:
            self.driver.save_screenshot(str(path))
        else:
            size = self.driver.get_window_size()
            self.driver.set_window_size(size["width"], height)
            try:
                self.driver.save_screenshot(str(path))
            finally:
                self.driver.set_window_size(size["width"], size["height"])
        target = os.environ.get(SCREENSHOT_DIR_ENV)
        if target and not name.startswith("failure-"):
            Path(target).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, Path(target) / path.name)
        return path

    def set_basic_auth(self, user: str | None, password: str | None = None) -> None:
        """Send HTTP basic credentials with every request from now on (``None``: stop), as the
        browser does once a person has answered the server's login prompt. Headless Chromium
        has no prompt to answer, so the DevTools protocol sets the header instead."""
        headers = {}
        if user is not None:
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        self.driver.execute_cdp_cmd("Network.enable", {})
        self.driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": headers})


def _xpath_literal(text: str) -> str:
    """``text`` as an XPath 1.0 string literal (which has no escape for quotes)."""
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'
    parts = text.split("'")
    return "concat(" + ', "\'", '.join(f"'{part}'" for part in parts) + ")"


class AirflowUI:
    """The Airflow 3 web UI of the stack: login page, DAG page, trigger form, run and task pages.

    The routes are the UI's own (``/dags/<dag>``, ``/dags/<dag>/runs/<run>``,
    ``.../tasks/<task>``); ids are URL-quoted because run ids hold ``:`` and ``+``.
    """

    def __init__(self, browser: Browser, base_url: str, user: str, password: str) -> None:
        self.browser = browser
        self.base_url = base_url.rstrip("/")
        self.user = user
        self.password = password

    def open(self, path: str) -> None:
        self.browser.set_basic_auth(None)
        self.browser.driver.get(f"{self.base_url}{path}")

    def login(self) -> None:
        """Sign in on the login page with the stack's admin user."""
        from selenium.webdriver.common.keys import Keys

        self.open("/")
        username = self.browser.find("input[name='username']")
        self.browser.type_into(username, self.user)
        password = self.browser.find("input[name='password']")
        self.browser.type_into(password, self.password)
        password.send_keys(Keys.ENTER)
        wait_for(
            "the Airflow UI after login",
            lambda: "/auth/" not in self.browser.driver.current_url,
            PAGE_TIMEOUT_S,
            0.5,
        )

    def open_dag(self, dag_id: str, tab: str = "") -> str:
        """The DAG's page (optionally one of its tabs, e.g. ``"runs"``); returns its text once
        the DAG's name shows."""
        self.open(f"/dags/{quote(dag_id, safe='')}" + (f"/{tab}" if tab else ""))
        return self.browser.wait_text(dag_id)

    def open_trigger_form(self, dag_id: str) -> None:
        """Open the DAG page and its "Trigger" dialog, with the params form rendered."""
        self.open_dag(dag_id)
        self.browser.click_text("Trigger", "button")
        self.browser.find("[role='dialog'] input[name^='element_']")

    def param_input(self, name: str) -> Any:
        """The text box of param ``name`` (every form field is named ``element_<param>``)."""
        return self.browser.find(f"input[name='element_{name}'], textarea[name='element_{name}']")

    def set_param(self, name: str, value: str | int | float) -> None:
        """Type ``value`` into the form field of param ``name``."""
        self.browser.type_into(self.param_input(name), str(value))

    def show_param(self, name: str) -> None:
        """Scroll the form so that param ``name`` is at the top (for a screenshot)."""
        self.browser.driver.execute_script(
            "arguments[0].scrollIntoView({block: 'start'});", self.param_input(name)
        )

    def set_switch(self, name: str, on: bool) -> None:
        """Turn a boolean param's switch on or off by clicking it, as a person does (its
        checkbox is visually hidden; the visible part is the switch's control)."""
        driver = self.browser.driver
        checkbox = driver.find_element("css selector", f"input[name='element_{name}']")
        if checkbox.is_selected() != on:
            control = driver.find_element(
                "css selector", f"[id='switch:element_{name}'] [data-part='control']"
            )
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", control)
            control.click()
        wait_for(f"switch {name} {on}", lambda: checkbox.is_selected() == on, 10, 0.2)

    def submit_trigger(self) -> None:
        dialog = self.browser.find("[role='dialog']")
        buttons = [b for b in dialog.find_elements("tag name", "button") if b.text == "Trigger"]
        assert buttons, f"no Trigger button in the dialog: {dialog.text[:500]}"
        buttons[-1].click()

    def run_path(self, dag_id: str, run_id: str) -> str:
        return f"/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"

    def open_run(self, dag_id: str, run_id: str) -> str:
        self.open(self.run_path(dag_id, run_id))
        return self.browser.wait_text(run_id)

    def open_task(self, dag_id: str, run_id: str, task_id: str, *needles: str) -> str:
        """The task instance's page (its log is the first tab) once it shows ``needles``."""
        self.open(f"{self.run_path(dag_id, run_id)}/tasks/{quote(task_id, safe='')}")
        return self.browser.wait_text(task_id, *needles, timeout_s=120)


class MlflowUI:
    """The MLflow UI of the stack behind its basic-auth app: registered model and version pages
    (``#/models/<name>``, ``#/models/<name>/versions/<n>``)."""

    def __init__(self, browser: Browser, base_url: str, user: str, password: str) -> None:
        self.browser = browser
        self.base_url = base_url.rstrip("/")
        self.user = user
        self.password = password

    def open(self, fragment: str) -> None:
        self.browser.set_basic_auth(self.user, self.password)
        self.browser.driver.get(f"{self.base_url}/#{fragment}")

    def tidy(self) -> None:
        """Answer what MLflow puts over a first visit, as a person would: take the new Model
        Registry UI its promotion dialog offers (the one that shows aliases) and close the
        assistant side panel. Both choices stick for the rest of the browser session."""
        driver = self.browser.driver
        for xpath in (
            "//button[normalize-space(.)='Try it now']",
            "//button[@aria-label='Close']",
        ):
            for element in driver.find_elements("xpath", xpath):
                try:
                    if element.is_displayed():
                        element.click()
                except Exception:  # re-rendered or gone meanwhile: nothing left to close
                    pass

    def show_tag(self, key: str) -> None:
        """Scroll a version page's tag table (a box of its own) to the tag ``key``."""
        element = self.browser.find_text(key)
        self.browser.driver.execute_script(
            "arguments[0].scrollIntoView({block: 'center'});", element
        )

    def open_model(self, name: str, *needles: str) -> str:
        """The registered model's page (its versions with their aliases) once it shows
        ``needles``."""
        self.open(f"/models/{quote(name, safe='')}")
        self.browser.wait_text(name)
        self.tidy()
        return self.browser.wait_text(name, *needles)

    def open_version(self, name: str, version: int, *needles: str) -> str:
        """One version's page (aliases, tags, source run) once it shows ``needles``."""
        self.open(f"/models/{quote(name, safe='')}/versions/{version}")
        self.browser.wait_text(f"Version {version}")
        self.tidy()
        return self.browser.wait_text(f"Version {version}", *needles)
