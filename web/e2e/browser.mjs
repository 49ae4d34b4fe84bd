// Launches Debian's Chromium (never a downloaded browser) headless with a
// fresh profile, for the scripts the Rust tests run (tests/browser.rs).
import { chromium } from "playwright-core";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

export const FLAGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

/** Runs `f(page)` in a fresh Chromium; failures of the page (uncaught
 *  errors, CSP violations, console errors) are collected in `problems`. */
export async function withPage(f) {
  const profile = mkdtempSync(join(tmpdir(), "mesh-chromium-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    headless: true,
    args: FLAGS,
    viewport: { width: 1280, height: 900 },
    timeout: 120_000,
  });
  const problems = [];
  try {
    const page = context.pages()[0] ?? (await context.newPage());
    page.setDefaultTimeout(60_000);
    page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
    page.on("console", (m) => {
      if (m.type() === "error") problems.push(`console error: ${m.text()} (${m.location()?.url ?? ""})`);
    });
    page.on("response", (r) => {
      if (r.status() >= 400) problems.push(`HTTP ${r.status()} for ${r.url()}`);
    });
    await f(page, problems);
  } finally {
    await context.close();
    rmSync(profile, { recursive: true, force: true });
  }
}

/** Fails with `message` unless `ok`. */
export function check(ok, message) {
  if (!ok) throw new Error(message);
}

/** Runs `main`, printing `PASS` or the failure, with an exit code. */
export function run(main) {
  const guard = setTimeout(() => {
    console.error("FAIL: the browser script took more than 280 s");
    process.exit(2);
  }, 280_000);
  main().then(
    () => {
      clearTimeout(guard);
      console.log("PASS");
    },
    (e) => {
      clearTimeout(guard);
      console.error(`FAIL: ${e?.stack ?? e}`);
      process.exit(1);
    },
  );
}
