// The browser half of tests/tests/console.rs: drives the scheduler's web
// console in Debian's headless Chromium through playwright-core.
//
// Environment (set by the Rust test):
//   FP_URL             the scheduler, e.g. http://127.0.0.1:40123
//   FP_ADMIN_KEY       an admin API key
//   FP_VIEWER_KEY      a viewer API key
//   FP_ROLLOUT_YAML    a rollout file for the simulated fleet (slow enough to act on)
//   FP_SCREENSHOTS     the directory the screenshots go to
//   FLEETPATCH_PLAYWRIGHT_DIR  the node_modules holding playwright-core
//   FLEETPATCH_CHROMIUM        the browser (default /usr/bin/chromium)
//
// Prints one "ok: ..." line per check and "ROLLOUT <id>" for the Rust side;
// any failed check exits non-zero with what was expected and what was seen.
// Waits use Playwright's auto-waiting and waitForFunction with timeouts,
// never fixed sleeps.

import { createRequire } from "node:module";
import { mkdirSync } from "node:fs";
import { join } from "node:path";

const env = (name, fallback) => {
  const value = process.env[name] ?? fallback;
  if (value === undefined || value === "") {
    throw new Error(`environment variable ${name} is required`);
  }
  return value;
};

const base = env("FP_URL");
const adminKey = env("FP_ADMIN_KEY");
const viewerKey = env("FP_VIEWER_KEY");
const rolloutYaml = env("FP_ROLLOUT_YAML");
const shots = env("FP_SCREENSHOTS");
const require = createRequire(join(env("FLEETPATCH_PLAYWRIGHT_DIR"), "noop.js"));
const { chromium } = require("playwright-core");

mkdirSync(shots, { recursive: true });

function check(condition, what, seen) {
  if (!condition) {
    throw new Error(`${what}${seen === undefined ? "" : ` (seen: ${JSON.stringify(seen)})`}`);
  }
  console.log(`ok: ${what}`);
}

async function shot(page, name) {
  // The viewport only: small files, the top of each page.
  await page.screenshot({ path: join(shots, `${name}.png`) });
}

async function login(page, key) {
  await page.goto(`${base}/login`);
  await page.fill("#credential", key);
  await Promise.all([page.waitForNavigation(), page.click("form[action='/login'] button[type=submit]")]);
  if (page.url() !== `${base}/`) {
    throw new Error(`login did not reach the rollouts: at ${page.url()}: ${await page.locator("main").innerText()}`);
  }
}

/// A POST from inside the page (same origin, the session cookie attached),
/// as a forged form would send it.
async function post(page, path, fields) {
  return page.evaluate(
    async ({ path, fields }) => {
      const response = await fetch(path, {
        method: "POST",
        body: new URLSearchParams(fields),
        redirect: "manual",
      });
      return { status: response.status, text: await response.text() };
    },
    { path, fields },
  );
}

const browser = await chromium.launch({
  executablePath: env("FLEETPATCH_CHROMIUM", "/usr/bin/chromium"),
  headless: true,
  args: ["--no-sandbox", "--disable-dev-shm-usage"],
});
let failed = false;
try {
  const admin = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await admin.newPage();
  page.setDefaultTimeout(30_000);
  const consoleErrors = [];
  // Script errors and CSP violations; a refused request (401, 403, 422 that
  // a check asked for) is not one.
  page.on("console", (message) => {
    if (message.type() === "error" && !message.text().startsWith("Failed to load resource")) {
      consoleErrors.push(message.text());
    }
  });
  page.on("pageerror", (error) => consoleErrors.push(String(error)));
  page.on("dialog", (dialog) => dialog.accept());

  // ------------------------------------------------------------- login
  const first = await page.goto(`${base}/`);
  check(page.url() === `${base}/login`, "an unauthenticated page request goes to the login page", page.url());
  const headers = first.headers();
  check(
    (headers["content-security-policy"] ?? "").includes("default-src 'self'"),
    "the login page carries a strict Content-Security-Policy",
    headers["content-security-policy"],
  );
  check(headers["x-frame-options"] === "DENY", "framing is denied", headers["x-frame-options"]);
  await shot(page, "login");
  await page.fill("#credential", "fpk_not_a_key");
  await page.click("form[action='/login'] button[type=submit]");
  await page.locator("p.error").waitFor();
  check(page.url() === `${base}/login`, "a bad key stays on the login page");
  await login(page, adminKey);
  const cookies = await admin.cookies();
  const session = cookies.find((c) => c.name === "fleetpatch_session");
  check(
    session && session.httpOnly && session.sameSite === "Strict" && session.path === "/",
    "the session cookie is HttpOnly, SameSite=Strict, Path=/",
    session,
  );

  // ------------------------------------------------------------- create: a mistake
  await page.goto(`${base}/rollouts/new`);
  const broken = "name: broken\nconcurrency: many\npatches: []\ntargets: []\n";
  await page.fill("#yaml", broken);
  await page.click("form.create button[type=submit]");
  await page.locator("#mistake").waitFor();
  const line = await page.locator("#error-line").textContent();
  const field = await page.locator("#error-field").textContent();
  check(line === "2" && field === "concurrency", "a YAML mistake shows its line and field", { line, field });
  check((await page.inputValue("#yaml")) === broken, "the pasted text is kept after a mistake");
  await shot(page, "create");

  // ------------------------------------------------------------- create: the rollout
  await page.fill("#yaml", rolloutYaml);
  await Promise.all([
    page.waitForURL(/\/rollouts\/[0-9a-f-]{36}$/),
    page.click("form.create button[type=submit]"),
  ]);
  const rolloutId = page.url().split("/").pop();
  console.log(`ROLLOUT ${rolloutId}`);
  check(true, "a rollout is created from pasted YAML");

  // ------------------------------------------------------------- live updates, no reload
  await page.locator(".summary[data-state=running]").waitFor();
  const before = Number(await page.locator("#done").getAttribute("data-done"));
  await page.evaluate(() => {
    window.__fpSamePage = "marker";
  });
  await page.waitForFunction(
    (before) => {
      const done = document.querySelector("#done");
      return done && Number(done.getAttribute("data-done")) > before;
    },
    before,
    { timeout: 60_000 },
  );
  const after = Number(await page.locator("#done").getAttribute("data-done"));
  const sameDocument = await page.evaluate(() => ({
    marker: window.__fpSamePage,
    navigations: performance.getEntriesByType("navigation").length,
  }));
  check(
    after > before && sameDocument.marker === "marker" && sameDocument.navigations === 1,
    "the finished count rises live, without a page reload",
    { before, after, ...sameDocument },
  );

  // ------------------------------------------------------------- pause, resume, completion
  await Promise.all([page.waitForNavigation(), page.click("button.action-pause")]);
  await page.locator(".summary[data-state=paused]").waitFor();
  check(true, "pause (after its confirm dialog) pauses the rollout");
  check((await page.locator("button.action-resume").count()) === 1, "a paused rollout offers resume");
  // The two hosts that fail their patch are among the first dispatched.
  await page.locator("table.reasons td").first().waitFor({ timeout: 60_000 });
  const reasons = await page.locator("table.reasons tr").count();
  check(reasons >= 1, "failures are grouped by reason, live", reasons);
  await shot(page, "rollout");
  await Promise.all([page.waitForNavigation(), page.click("button.action-resume")]);
  await page.evaluate(() => {
    window.__fpSamePage = "after-resume";
  });
  await page.locator(".summary[data-state=completed]").waitFor({ timeout: 120_000 });
  const stillSame = await page.evaluate(() => window.__fpSamePage);
  check(stillSame === "after-resume", "resumed, the rollout is seen completing live", stillSame);
  check((await page.locator(".summary button.action-pause, .summary button.action-abort").count()) === 0, "a completed rollout offers no pause or abort");
  check((await page.locator(".summary button.action-retry-failed").count()) === 1, "a completed rollout with failures offers retry failed");
  const failedCount = await page.locator(".counts [data-state=failed]").getAttribute("data-count");
  check(failedCount === "2", "the counts show the two failed hosts", failedCount);

  // ------------------------------------------------------------- host search, escaping
  await page.fill("form.filters input[name=host]", "SCRIPT");
  await Promise.all([page.waitForNavigation(), page.click("form.filters button[type=submit]")]);
  check((await page.locator("table.targets tbody tr").count()) === 1, "the host search finds one target");
  const scriptHost = page.locator("table.targets a", { hasText: "<script>" });
  check((await scriptHost.count()) === 1, "a <script> host name is shown as text");
  const pwned = await page.evaluate(() => window.__pwned);
  check(pwned === undefined, "a <script> in a host name does not run", pwned);

  // ------------------------------------------------------------- filters and paging
  await page.goto(`${base}/rollouts/${rolloutId}?state=succeeded`);
  const firstPage = await page.locator("table.targets tbody tr").count();
  check(firstPage === 50, "a page holds 50 targets", firstPage);
  await Promise.all([page.waitForNavigation(), page.click("nav.paging a.next")]);
  const secondPage = await page.locator("table.targets tbody tr").count();
  check(secondPage > 0 && secondPage < 50, "the next page holds the rest", secondPage);

  // ------------------------------------------------------------- a target
  await page.goto(`${base}/rollouts/${rolloutId}`);
  await Promise.all([page.waitForNavigation(), page.locator("table.targets tbody tr a").first().click()]);
  await page.locator("table.patches").waitFor();
  const codes = await page.locator("td.exit-code").allTextContents();
  check(codes.length > 0 && codes.every((code) => code.trim() === "0"), "the target page shows exit codes", codes);
  check((await page.locator("pre.tail").count()) > 0, "the target page shows output tails");
  check((await page.locator("ol.moves li").count()) >= 3, "the target page shows its state changes");
  check((await page.locator("ol.events li").count()) > 0, "the target page shows its agent events");
  await shot(page, "target");

  // ------------------------------------------------------------- the list
  await page.goto(`${base}/`);
  const row = page.locator(`tr[data-rollout="${rolloutId}"]`);
  check((await row.locator(".state-completed").count()) === 1, "the rollouts list shows the rollout completed");
  await shot(page, "rollouts");

  // ------------------------------------------------------------- CSRF
  const noToken = await post(page, `/rollouts/${rolloutId}/abort`, {});
  check(noToken.status === 403 && noToken.text.includes("CSRF"), "a POST without the CSRF token is refused", noToken.status);
  const otherToken = await post(page, `/rollouts/${rolloutId}/abort`, { csrf: "00".repeat(32) });
  check(otherToken.status === 403, "a POST with a wrong CSRF token is refused", otherToken.status);
  check(consoleErrors.length === 0, "no script error and no CSP violation on the admin's pages", consoleErrors);

  // ------------------------------------------------------------- a viewer
  const viewerContext = await browser.newContext();
  const viewer = await viewerContext.newPage();
  viewer.setDefaultTimeout(30_000);
  await login(viewer, viewerKey);
  check((await viewer.locator("a[href='/rollouts/new']").count()) === 0, "a viewer is offered no new rollout");
  await viewer.goto(`${base}/rollouts/${rolloutId}`);
  check((await viewer.locator("button.action, .actions").count()) === 0, "a viewer sees no button");
  const viewerCsrf = await viewer.locator("form.logout input[name=csrf]").inputValue();
  check(viewerCsrf.length === 64, "a viewer's page carries its own CSRF token");
  const forged = await post(viewer, `/rollouts/${rolloutId}/retry-failed`, { csrf: viewerCsrf });
  check(forged.status === 403 && forged.text.includes("operator"), "a viewer's forged POST is refused with 403", forged);
  const forgedCreate = await post(viewer, "/rollouts/new", { csrf: viewerCsrf, yaml: rolloutYaml });
  check(forgedCreate.status === 403, "a viewer's forged create is refused with 403", forgedCreate.status);

  // ------------------------------------------------------------- logout
  await Promise.all([viewer.waitForURL(`${base}/login`), viewer.click("form.logout button")]);
  const left = (await viewerContext.cookies()).find((c) => c.name === "fleetpatch_session");
  check(left === undefined, "logout clears the cookie", left);
  await viewer.goto(`${base}/rollouts/${rolloutId}`);
  check(viewer.url() === `${base}/login`, "after logout the console asks for a login again", viewer.url());
} catch (error) {
  failed = true;
  console.error(`FAILED: ${error && error.stack ? error.stack : error}`);
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
