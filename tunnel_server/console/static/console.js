// identity-tunnel admin console: live updates for the overview and the live tunnels page,
// client-side filter and sort, two-step revoke buttons. Hand-written, no dependencies; every
// value from the server is put in the page as text (textContent), never as markup, except the
// overview's fragments, which the server renders with everything escaped.
"use strict";

(() => {
  const body = document.body;
  const page = body.dataset.page;
  const poll = Number(body.dataset.poll) || 0;
  const csrf = body.dataset.csrf || "";
  const status = (text) => {
    const el = document.getElementById("status");
    if (el) el.textContent = text;
  };

  async function getJson(url) {
    const response = await fetch(url, { headers: { Accept: "application/json" },
                                         credentials: "same-origin", cache: "no-store" });
    if (response.status === 401) throw new Error("signed out: reload the page to sign in");
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    return response.json();
  }

  function every(ms, work) {
    const run = async () => {
      try {
        await work();
      } catch (error) {
        status(String(error.message || error));
      }
      setTimeout(run, ms);
    };
    setTimeout(run, ms);
  }

  // -- overview: the server renders the fragments (escaped); swap them in ------------------
  function overview() {
    every(poll, async () => {
      const data = await getJson("/console/api/overview");
      for (const [id, html] of Object.entries(data.fragments)) {
        const el = document.querySelector(`[data-live="${id}"]`);
        if (el) el.innerHTML = html;
      }
      status(`updated ${data.at}`);
    });
  }

  // -- live tunnels ---------------------------------------------------------------------
  const state = { rows: [], sort: "duration", dir: "desc", armed: null, scope: "" };
  const text = (value) => (value === null || value === undefined ? "—" : String(value));

  function bytes(n) {
    if (n === null || n === undefined) return "—";
    const units = ["B", "KiB", "MiB", "GiB"];
    let value = n;
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
    return unit === 0 ? `${value} B` : `${value.toFixed(1)} ${units[unit]}`;
  }

  function duration(seconds) {
    const s = Math.floor(seconds);
    const h = Math.floor(s / 3600);
    const m = Math.floor((s % 3600) / 60);
    return h ? `${h}h${String(m).padStart(2, "0")}m` : `${m}m${String(s % 60).padStart(2, "0")}s`;
  }

  const sortKey = {
    principal: (r) => r.principal, target: (r) => r.target || "", port: (r) => r.port || 0,
    client: (r) => r.client || "", node: (r) => r.node, dialect: (r) => r.dialect,
    bytes: (r) => (r.bytes_from_client || 0) + (r.bytes_to_client || 0),
    duration: (r) => r.duration, state: (r) => r.state || "",
  };

  function revokeButton(kind, subject, label) {
    const button = document.createElement("button");
    button.type = "button";
    const key = `${kind}:${subject}`;
    const armed = state.armed === key;
    button.textContent = armed ? `Confirm: ${label.toLowerCase()}` : label;
    button.className = armed ? "armed" : "";
    button.dataset.kind = kind;
    button.addEventListener("click", () => revoke(kind, subject, key));
    const form = document.createElement("span");
    form.className = "revoke";
    form.append(button);
    return form;
  }

  async function revoke(kind, subject, key) {
    if (state.armed !== key) {  // first click arms, the second revokes
      state.armed = key;
      render();
      return;
    }
    state.armed = null;
    const response = await fetch("/console/api/revoke", {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-Console-Csrf": csrf },
      body: JSON.stringify({ kind, subject }),
    });
    const data = await response.json().catch(() => ({}));
    status(response.ok ? `revoked: ${data.closed} tunnel(s) closed on this node`
                       : `revoke failed: ${data.error || response.status}`);
    await refresh();
  }

  function render() {
    const started = performance.now();
    const filter = (document.getElementById("filter")?.value || "").trim().toLowerCase();
    const rows = state.rows.filter((r) => !filter || [r.principal, r.target, r.client, r.node,
      r.dialect, r.address, r.sid].some((v) => v && String(v).toLowerCase().includes(filter)));
    const key = sortKey[state.sort] || sortKey.duration;
    rows.sort((a, b) => {
      const x = key(a);
      const y = key(b);
      const order = x < y ? -1 : x > y ? 1 : 0;
      return state.dir === "asc" ? order : -order;
    });
    const tbody = document.querySelector("#tunnels tbody");
    const fragment = document.createDocumentFragment();
    for (const r of rows) {
      const tr = document.createElement("tr");
      tr.dataset.sid = r.sid;
      const cells = [r.principal, text(r.target), text(r.port), text(r.client), r.node,
        r.dialect, `${bytes(r.bytes_from_client)} / ${bytes(r.bytes_to_client)}`,
        duration(r.duration), text(r.state)];
      for (const value of cells) {
        const td = document.createElement("td");
        td.textContent = value;
        tr.append(td);
      }
      const actions = document.createElement("td");
      actions.append(revokeButton("session", r.sid, "Revoke session"),
                     revokeButton("user", r.principal, "Revoke user"));
      tr.append(actions);
      fragment.append(tr);
    }
    tbody.replaceChildren(fragment);
    document.getElementById("shown").textContent =
      `${rows.length} of ${state.rows.length} tunnels`;
    for (const button of document.querySelectorAll("button.sort")) {
      button.dataset.dir = button.dataset.sort === state.sort ? state.dir : "";
    }
    window.consoleRender = { rows: rows.length, ms: performance.now() - started };
  }

  async function refresh() {
    const data = await getJson("/console/api/tunnels");
    state.rows = data.tunnels;
    render();
    status(`updated ${data.at} (${data.scope === "cluster" ? "whole cluster" : "this node"})`);
  }

  function tunnels() {
    document.getElementById("filter").addEventListener("input", render);
    for (const button of document.querySelectorAll("button.sort")) {
      button.addEventListener("click", () => {
        const key = button.dataset.sort;
        state.dir = state.sort === key && state.dir === "desc" ? "asc" : "desc";
        state.sort = key;
        render();
      });
    }
    refresh().catch((error) => status(String(error.message || error)));
    every(poll, refresh);
  }

  if (page === "overview" && poll) overview();
  if (page === "tunnels" && poll) tunnels();
})();
