// The dashboard's one script of its own. Every change a page offers is a call to the admin
// API (`data-api="METHOD /admin/..."` on a form or a button), made with the session cookie
// and the session's CSRF token, read from the page's <meta name="csrf-token">.
"use strict";

(function () {
  const csrf = () => document.querySelector('meta[name="csrf-token"]').content;

  function flash(message, kind) {
    const box = document.getElementById("flash");
    if (!box) return;
    box.textContent = message;
    box.className = "flash " + (kind || "error");
    box.hidden = false;
  }

  async function call(spec, body) {
    const space = spec.indexOf(" ");
    const method = spec.slice(0, space);
    const path = spec.slice(space + 1);
    if (!path.startsWith("/admin/")) throw new Error("not an admin API path: " + path);
    const init = {
      method: method,
      credentials: "same-origin",
      headers: { "accept": "application/json" },
    };
    if (method !== "GET") init.headers["x-csrf-token"] = csrf();
    if (body !== undefined) {
      init.headers["content-type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    const text = await response.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
    if (response.status === 401) {
      window.location.assign("/ui/sign-in");
      throw new Error("the session has ended");
    }
    if (!response.ok) {
      const error = data && data.error ? data.error : null;
      const where = error && error.param ? " (" + error.param + ")" : "";
      throw new Error((error ? error.message : "HTTP " + response.status) + where);
    }
    return data;
  }

  // Micro-units from a decimal amount as typed ("12.5" -> 12500000), exactly: no floats.
  function micros(text) {
    const match = /^(\d{1,12})(?:\.(\d{0,6}))?$/.exec(text);
    if (!match) throw new Error("an amount is a number with at most 6 decimals: " + text);
    return Number(match[1]) * 1000000 + Number((match[2] || "").padEnd(6, "0"));
  }

  function whole(text) {
    if (!/^\d{1,12}$/.test(text)) throw new Error("a whole number, not " + text);
    return Number(text);
  }

  const KINDS = {
    text: (v) => v,
    money: micros,
    int: whole,
    days: (v) => whole(v) * 86400,
    list: (v) => v.split(",").map((s) => s.trim()).filter((s) => s),
  };

  // A form's fields as the API's JSON body: empty fields are left out, or sent as null
  // (no limit) where the field says `data-empty="null"`.
  function bodyOf(form) {
    const body = {};
    for (const field of form.elements) {
      if (!field.name || field.disabled) continue;
      const value = field.value.trim();
      const kind = field.dataset.kind || "text";
      if (value === "") {
        if (field.dataset.empty === "null") body[field.name] = null;
        continue;
      }
      if (field.name === "expires_in") body.expires_in = KINDS.days(value);
      else body[field.name] = (KINDS[kind] || KINDS.text)(value);
    }
    return body;
  }

  function showSecret(created) {
    const dialog = document.getElementById("secret");
    document.getElementById("secret-value").textContent = created.key;
    dialog.addEventListener("close", () => window.location.reload(), { once: true });
    dialog.showModal();
  }

  // What a person reads first: the verdict of a verification in words; the record follows.
  function summaryOf(data) {
    if (!data || !Array.isArray(data.chains)) return "";
    const receipts = data.chains.reduce((n, chain) => n + (chain.receipts || 0), 0);
    const broken = data.chains.filter((chain) => !chain.ok).length;
    if (data.ok) return `Every chain verified: ${data.chains.length} chain(s), ${receipts} receipt(s).`;
    return `${broken} of ${data.chains.length} chain(s) failed verification: see each chain's problem below.`;
  }

  function showResult(title, data) {
    document.getElementById("result-title").textContent = title || "Result";
    document.getElementById("result-summary").textContent = summaryOf(data);
    document.getElementById("result-body").textContent = JSON.stringify(data, null, 2);
    document.getElementById("result").showModal();
  }

  async function act(element, body) {
    if (element.dataset.confirm && !window.confirm(element.dataset.confirm)) return;
    const data = await call(element.dataset.api, body);
    const then = element.dataset.then || "reload";
    if (then === "secret") showSecret(data);
    else if (then === "result") showResult(element.dataset.title, data);
    else window.location.reload();
  }

  document.addEventListener("submit", (event) => {
    const form = event.target;
    if (!form.dataset || !form.dataset.api) return;
    event.preventDefault();
    let body;
    try { body = bodyOf(form); } catch (e) { flash(e.message); return; }
    act(form, body).catch((e) => flash(e.message));
  });

  document.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-api]");
    if (!button) return;
    event.preventDefault();
    act(button).catch((e) => flash(e.message));
  });

  window.aihub = { call: call, flash: flash };
})();
