// The mesh dashboard in a real browser while the shop is under load: the
// graph shows every edge of the shop, the rates move from scrape to scrape,
// and a SIGKILLed replica shows up as an endpoint out of rotation.
// Env: DASHBOARD_URL; EXPECTED_EDGES ("gateway>auth,orders>inventory,...");
// STATUS_JSON (shopctl up's status file, for the pid to kill); KILL ("inventory:1");
// SCREENSHOT (a .png path).
import { readFileSync } from "node:fs";
import { check, run, withPage } from "./browser.mjs";

const edges = process.env.EXPECTED_EDGES.split(",").map((e) => e.split(">"));
const [killService, killReplica] = process.env.KILL.split(":");

/** The pid of the replica to kill, once the supervisor runs it. */
function victimPid() {
  const status = JSON.parse(readFileSync(process.env.STATUS_JSON, "utf8"));
  const p = status.processes.find((p) => p.service === killService && String(p.replica) === killReplica);
  return p?.state === "running" ? p.pid : null;
}

const seq = (page) => page.evaluate(() => Number(document.querySelector("#updated")?.dataset.seq ?? 0));

run(() =>
  withPage(async (page, problems) => {
    await page.goto(process.env.DASHBOARD_URL);
    await page.waitForSelector("#updated[data-seq]");

    // Every edge of the shop is drawn.
    for (const [from, to] of edges) {
      await page.waitForSelector(`#graph g.edge[data-from="${from}"][data-to="${to}"]`, { timeout: 60_000 });
    }

    // The rates move: each new scrape redraws the edges with that
    // window's rates; the saga's own calls (orders → inventory, payments)
    // carry traffic too.
    const rates = new Map(edges.map(([f, t]) => [`${f}>${t}`, new Set()]));
    let last = await seq(page);
    for (let scrapes = 0; scrapes < 60; ) {
      await page.waitForFunction((s) => Number(document.querySelector("#updated").dataset.seq) > s, last, { timeout: 30_000 });
      last = await seq(page);
      scrapes++;
      const now = await page.$$eval("#graph g.edge", (gs) => gs.map((g) => [`${g.dataset.from}>${g.dataset.to}`, Number(g.dataset.rps)]));
      for (const [key, rps] of now) rates.get(key)?.add(rps);
      const moved = (key) => [...(rates.get(key) ?? [])].filter((r) => r > 0).length >= 3;
      if (scrapes >= 5 && ["gateway>orders", "gateway>inventory", "orders>inventory", "orders>payments"].every(moved)) break;
    }
    const summary = Object.fromEntries([...rates].map(([k, v]) => [k, [...v].sort((a, b) => a - b)]));
    for (const key of ["gateway>orders", "gateway>inventory", "orders>inventory", "orders>payments"]) {
      const nonZero = summary[key].filter((r) => r > 0);
      check(nonZero.length >= 3, `${key}'s rate did not move over the scrapes: ${JSON.stringify(summary[key])}`);
    }

    // A replica killed shows up as an endpoint out of rotation. The
    // supervisor restarts it within about a second; each kill soon after a
    // restart doubles its backoff, so a few kills make the outage longer
    // than a scrape window.
    const out = `#events li[data-kind=out]`;
    let kills = 0;
    for (; kills < 6; kills++) {
      let pid = null;
      for (let i = 0; i < 60 && pid === null; i++) {
        pid = victimPid();
        if (pid === null) await page.waitForTimeout(500);
      }
      check(pid !== null, `${killService}[${killReplica}] did not come back to be killed`);
      process.kill(pid, "SIGKILL");
      const seen = await page
        .waitForFunction(
          ([sel, svc]) => [...document.querySelectorAll(sel)].some((li) => li.textContent.includes(`→ ${svc}:`)),
          [out, killService],
          { timeout: 15_000 },
        )
        .then(() => true, () => false);
      if (seen) break;
    }
    check(kills < 6, "six kills of a replica never showed an endpoint out of rotation");
    const event = await page.$$eval(out, (lis) => lis.map((li) => li.textContent));
    await page.waitForSelector(
      `#processes tr[data-service="${killService}"][data-replica="${killReplica}"]`,
    );
    await page.screenshot({ path: process.env.SCREENSHOT, fullPage: true });
    check(problems.length === 0, `the page had problems:\n${problems.join("\n")}`);
    console.log(JSON.stringify({ kills: kills + 1, events: event.slice(0, 3), rates: summary }));
  }),
);
