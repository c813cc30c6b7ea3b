"""The admin stats page (issue #13 item 2), with Django's own test runner
(``admin_settings``), run by ``test_admin_stats_page.py`` in a subprocess;
not collected by pytest.

``AdminStatsViews``: the views with Django's test client (staff only, JSON,
a clear 503 without a broker). ``AdminStatsPage``: a staff user logs in with
a real headless Chromium (Selenium) on a live server, watches the page, and
sees a message sent during the test appear in the numbers; the page is saved
as a screenshot (``DMB_SCREENSHOT``).
"""

import os
import shutil
import socket
import tempfile
import threading

from django.contrib.auth import get_user_model
from django.contrib.staticfiles.testing import StaticLiveServerTestCase
from django.test import TestCase, override_settings

from django_message_broker import SyncClient

ADDRESS = os.environ["DMB_TEST_ADDRESS"]
WAIT = 20.0  # seconds for any one condition in the browser
CHROMIUM = os.environ.get("DMB_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("DMB_CHROMEDRIVER", "/usr/bin/chromedriver")
CHROMIUM_FLAGS = [
    # as root, in a container, on a closed network: without the last four it stalls
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--no-default-browser-check", "--disable-extensions", "--window-size=1280,1400",
]  # fmt: skip


def free_address():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


class AdminStatsViews(TestCase):
    @classmethod
    def setUpTestData(cls):
        users = get_user_model().objects
        cls.staff = users.create_user("staff", password="pw", is_staff=True)
        cls.visitor = users.create_user("visitor", password="pw")

    def test_staff_get_the_brokers_stats_as_json(self):
        with SyncClient(ADDRESS) as client:
            client.send("views.waiting", b"x")
            self.client.force_login(self.staff)
            response = self.client.get("/admin/broker/data/")
        self.assertEqual(response.status_code, 200)
        detail = response.json()
        self.assertEqual(detail["address"], ADDRESS)
        rows = {row["name"]: row for row in detail["channels"]}
        self.assertEqual(rows["views.waiting"]["queued"], 1)
        self.assertIn("no-cache", response["Cache-Control"])
        page = self.client.get("/admin/broker/")
        self.assertContains(page, 'data-url="/admin/broker/data/"')
        self.assertContains(page, "Message broker")

    def test_others_get_nothing(self):
        self.assertEqual(self.client.get("/admin/broker/data/").status_code, 403)
        page = self.client.get("/admin/broker/")
        self.assertEqual(page.status_code, 302)
        self.assertIn("/admin/login/", page["Location"])
        self.client.force_login(self.visitor)
        self.assertEqual(self.client.get("/admin/broker/data/").json(), {"error": "staff only"})

    def test_no_broker_is_a_503_that_says_so(self):
        address = free_address()
        layers = {"default": {"BACKEND": "django_message_broker.ChannelsServerLayer", "CONFIG": {"address": address}}}
        self.client.force_login(self.staff)
        with override_settings(CHANNEL_LAYERS=layers):
            response = self.client.get("/admin/broker/data/")
        self.assertEqual(response.status_code, 503)
        self.assertEqual(response.json(), {"error": f"no broker answered at {address} within 2s"})


class Traffic:
    """A sender and a receiver on one channel, a few dozen messages a second,
    so the chart has something to draw; stopped by ``stop()``."""

    def __init__(self, channel):
        self.channel = channel
        self.done = threading.Event()
        self.sender = SyncClient(ADDRESS)
        self.receiver = SyncClient(ADDRESS)
        self.threads = [threading.Thread(target=self.send), threading.Thread(target=self.receive)]

    def send(self):
        sent = 0
        while not self.done.wait(0.01 if sent // 40 % 2 else 0.03):  # pacing (bursts), not waiting for a condition
            self.sender.send(self.channel, b'{"type": "chat.message", "text": "hello"}')
            sent += 1

    def receive(self):
        while not self.done.is_set():
            try:
                self.receiver.receive(self.channel, timeout=0.2)
            except TimeoutError:
                pass

    def start(self):
        self.sender.group_add("room-lobby", self.channel)
        for thread in self.threads:
            thread.start()
        return self

    def stop(self):
        self.done.set()
        for thread in self.threads:
            thread.join(10)
        self.sender.close()
        self.receiver.close()


class AdminStatsPage(StaticLiveServerTestCase):
    @classmethod
    def setUpClass(cls):
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service

        super().setUpClass()
        cls.profile = tempfile.mkdtemp(prefix="dmb-chromium-")
        options = Options()
        options.binary_location = CHROMIUM
        for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={cls.profile}"]:
            options.add_argument(flag)
        try:
            cls.browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        except BaseException:
            shutil.rmtree(cls.profile, ignore_errors=True)
            super().tearDownClass()
            raise
        cls.browser.set_page_load_timeout(WAIT)

    @classmethod
    def tearDownClass(cls):
        cls.browser.quit()
        shutil.rmtree(cls.profile, ignore_errors=True)
        super().tearDownClass()

    def wait_until(self, condition, what):
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.browser, WAIT, poll_frequency=0.1).until(condition, f"waiting for {what}")

    def cell(self, channel, column):
        from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
        from selenium.webdriver.common.by import By

        try:
            row = self.browser.find_element(By.CSS_SELECTOR, f'#dmb-channels tr[data-channel="{channel}"]')
            return row.find_element(By.CSS_SELECTOR, f"td.{column}").text
        except (NoSuchElementException, StaleElementReferenceException):
            return None

    def test_staff_watch_a_message_arrive(self):
        from selenium.webdriver.common.by import By

        get_user_model().objects.create_superuser("admin", "admin@example.com", "pw")
        browser = self.browser
        browser.get(f"{self.live_server_url}/admin/login/?next=/admin/broker/")
        browser.find_element(By.ID, "id_username").send_keys("admin")
        browser.find_element(By.ID, "id_password").send_keys("pw")
        browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
        self.wait_until(lambda b: "dmb-live" in b.find_element(By.ID, "dmb-status").get_attribute("class"), "live")
        self.assertIsNone(self.cell("reports.pending", "queued"))

        traffic = Traffic("chat.lobby").start()
        try:
            with SyncClient(ADDRESS) as client:
                for _ in range(7):  # nobody receives these: they stay queued
                    client.send("reports.pending", b"x" * 100)
                self.wait_until(lambda b: self.cell("reports.pending", "queued") == "7", "the 7 queued messages")
                self.assertEqual(self.cell("reports.pending", "enqueued"), "7")
                pids = {e.text for e in browser.find_elements(By.CSS_SELECTOR, "#dmb-clients td.pid")}
                self.assertIn(str(os.getpid()), pids)
                chart = browser.find_element(By.ID, "dmb-chart")
                self.wait_until(lambda b: float(chart.get_attribute("data-peak") or 0) > 0, "a rate on the chart")
                self.wait_until(lambda b: self.cell("chat.lobby", "delivered") not in (None, "0"), "deliveries")
                # a few seconds of traffic on the chart, for the screenshot
                started = int(chart.get_attribute("data-samples"))
                self.wait_until(lambda b: int(chart.get_attribute("data-samples")) >= started + 6, "more samples")
                self.assertTrue(browser.find_element(By.ID, "dmb-total-queued").text.replace(",", "").isdigit())
                screenshot = os.environ.get("DMB_SCREENSHOT")
                if screenshot:
                    self.assertTrue(browser.save_screenshot(screenshot))
        finally:
            traffic.stop()
