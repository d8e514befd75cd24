// The mesh page's refresh: every few seconds, fetch this page's server-rendered fragment and swap it in, so the page
// follows the mesh without a reload. The fragment is escaped by the server; the CSP runs no script it did not serve.
"use strict";

(function () {
  const live = document.getElementById("live");
  const status = document.getElementById("refresh-status");
  if (!live || !live.dataset.fragment) {
    return;
  }
  const period = Math.max(1000, Number(live.dataset.refreshMs) || 5000);
  let busy = false;

  async function refresh() {
    if (busy || document.hidden) {
      return; // one request at a time; none while the tab is hidden
    }
    busy = true;
    try {
      const answer = await fetch(live.dataset.fragment, { cache: "no-store", credentials: "same-origin" });
      if (!answer.ok) {
        throw new Error("HTTP " + answer.status);
      }
      const html = await answer.text();
      // a table scrolled sideways (on a phone) stays where its reader left it
      const scrolled = [...live.querySelectorAll(".scroll")].map((box) => box.scrollLeft);
      live.innerHTML = html;
      live.querySelectorAll(".scroll").forEach((box, i) => {
        box.scrollLeft = scrolled[i] || 0;
      });
      status.textContent = "live · updated " + new Date().toLocaleTimeString();
      status.classList.remove("bad");
    } catch (err) {
      status.textContent = "coordinator unreachable (" + err.message + "), retrying";
      status.classList.add("bad");
    } finally {
      busy = false;
    }
  }

  window.setInterval(refresh, period);
  document.addEventListener("visibilitychange", refresh);
})();
