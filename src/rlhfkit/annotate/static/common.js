// Shared by both pages: sign-in, API calls, safe DOM building, toasts.
// Every text that comes from the server (prompts, generations, comments, names) goes into
// the page through textContent, never innerHTML: generated text is untrusted.
"use strict";

const TOKEN_KEY = "rlhfkit-annotate-token";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

function getToken() { return localStorage.getItem(TOKEN_KEY); }

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `request failed with HTTP ${status}`);
    this.status = status;
    this.code = body && body.error;
  }
}

async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${getToken() || ""}` };
  if (options.json !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method: options.method || "GET",
    headers,
    body: options.json !== undefined ? JSON.stringify(options.json) : undefined,
  });
  if (options.raw && response.ok) return response;
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    if (response.status === 401) showLogin(body && body.message);
    throw new ApiError(response.status, body);
  }
  return { status: response.status, body };
}

let toastTimer = null;
function toast(message, actionLabel, action) {
  const box = document.getElementById("toast");
  box.replaceChildren(el("span", { text: message }));
  if (actionLabel) {
    box.append(el("button", { type: "button", class: "link", text: actionLabel, onclick: () => {
      box.hidden = true;
      action();
    } }));
  }
  box.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { box.hidden = true; }, 8000);
}

function showError(error) {
  toast(error instanceof Error ? error.message : String(error));
}

function showLogin(message) {
  document.getElementById("main").hidden = true;
  document.getElementById("login").hidden = false;
  document.getElementById("login-message").textContent = message || "";
  document.getElementById("token").focus();
}

// Sign in from the stored token, a "#token=..." link (the fragment never reaches the
// server) or the form; then call startPage(me).
async function initPage(startPage) {
  const fragment = new URLSearchParams(location.hash.slice(1));
  if (fragment.get("token")) {
    localStorage.setItem(TOKEN_KEY, fragment.get("token"));
    history.replaceState(null, "", location.pathname + location.search);
  }
  document.getElementById("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    localStorage.setItem(TOKEN_KEY, document.getElementById("token").value.trim());
    await enter();
  });
  document.getElementById("logout").addEventListener("click", () => {
    localStorage.removeItem(TOKEN_KEY);
    document.getElementById("whoami").textContent = "";
    showLogin("Signed out.");
  });
  async function enter() {
    if (!getToken()) { showLogin(); return; }
    let me;
    try { me = (await api("/api/me")).body; } catch (e) { if (e.status !== 401) showError(e); return; }
    document.getElementById("login").hidden = true;
    document.getElementById("main").hidden = false;
    document.getElementById("whoami").textContent = me.is_admin ? `${me.name} (admin)` : me.name;
    startPage(me);
  }
  await enter();
}
