// The search page of `instret serve`: every name is set as text (textContent), never as HTML.
"use strict";

const API = "/api/v1";
const $ = (id) => document.getElementById(id);

function say(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function getJSON(url, options) {
  const response = await fetch(url, options);
  let body;
  try {
    body = await response.json();
  } catch {
    throw new Error(`${response.status} ${response.statusText}`);
  }
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function baseName(path) {
  return path.split("/").pop();
}

// How unusual a score is for this index (instret.calibration): the share of unrelated pairs
// that score at least as high.
function meaning(hit) {
  if (hit.unrelated_above === undefined) return "";
  const share = hit.unrelated_above;
  if (share <= 0) return "above every unrelated pair measured";
  if (share >= 0.5) return `${Math.round(share * 100)}% of unrelated pairs score this high`;
  return `1 in ${Math.round(1 / share).toLocaleString("en")} unrelated pairs score this high`;
}

function picture(id, path, onSearch, missing = false) {
  const button = element("button");
  button.type = "button";
  button.title = `Search from ${path}`;
  button.setAttribute("aria-label", `Search from ${baseName(path)}`);
  if (missing) {
    // Gone since it was indexed: a struck-out tile, not a request for a thumbnail that cannot come.
    button.classList.add("gone");
    button.append(element("span", "", "file missing"));
  } else {
    const img = element("img");
    img.src = `${API}/thumbnail/${id}?size=160`;
    img.alt = "";
    img.loading = "lazy";
    button.append(img);
  }
  button.addEventListener("click", onSearch);
  return button;
}

// The search options every request carries.
function options() {
  return `k=${$("k").value}${$("existing-only").checked ? "&existing_only=1" : ""}`;
}

function missingText(count) {
  return count ? `; gone since indexing: ${count} of them (struck out)` : "";
}

function fileLink(id, path) {
  const link = element("a", "name", baseName(path));
  link.href = `${API}/image/${id}`;
  link.target = "_blank";
  link.rel = "noopener";
  link.title = path;
  return link;
}

function showQuery(src, name) {
  $("results").hidden = false;
  $("query-picture").src = src;
  $("query-name").textContent = `Query: ${name}`;
  $("hits").replaceChildren();
}

function render(query) {
  const list = $("hits");
  list.replaceChildren();
  for (const hit of query.results) {
    const item = element("li", hit.missing ? "hit missing" : "hit");
    item.dataset.id = hit.id;
    item.dataset.path = hit.path;
    item.append(
      picture(hit.id, hit.path, () => searchIndexed(hit.id, hit.path), hit.missing),
      element("span", "score", `#${hit.rank} · ${hit.score.toFixed(4)}`),
      element("span", "meaning", meaning(hit)),
      fileLink(hit.id, hit.path),
    );
    list.append(item);
  }
  const missing = query.results.filter((hit) => hit.missing).length;
  say(`${query.results.length} results for ${query.query}${missingText(missing)}`);
}

async function run(search) {
  say("Searching…");
  try {
    const found = await search();
    render(found.queries[0]);
  } catch (error) {
    say(error.message, true);
  }
}

// The last search, so that changing k or "existing files only" runs it again.
let repeat = null;

function searchFile(file) {
  if (!file) return;
  repeat = () => searchFile(file);
  const name = file.name || "pasted image";
  showQuery(URL.createObjectURL(file), name);
  const url = `${API}/search?${options()}&name=${encodeURIComponent(name)}`;
  return run(() =>
    getJSON(url, {
      method: "POST",
      body: file,
      headers: { "content-type": file.type || "application/octet-stream" },
    }),
  );
}

function searchIndexed(id, path) {
  repeat = () => searchIndexed(id, path);
  showQuery(`${API}/thumbnail/${id}?size=256`, path);
  window.scrollTo({ top: 0 });
  return run(() => getJSON(`${API}/search?id=${id}&${options()}`));
}

async function showInfo() {
  try {
    const info = await getJSON(`${API}/info`);
    $("index-info").textContent =
      `${info.vectors.toLocaleString("en")} images under ${info.root} · ${info.index_type} · ${info.generation}`;
  } catch (error) {
    $("index-info").textContent = `The index is unavailable: ${error.message}`;
  }
}

// What the server says it is doing while it finds the groups (a large folder takes minutes).
function progressText(now) {
  const waited = `${Math.round(now.seconds)} s`;
  if (now.stage === "verify") {
    return `Finding duplicate groups: aligning likely pairs, ${now.done.toLocaleString("en")} of ${now.total.toLocaleString("en")} checked · ${waited}`;
  }
  return `Finding duplicate groups: searching the index for similar pairs… ${waited}`;
}

async function showDuplicates() {
  const box = $("groups");
  const button = $("show-dups");
  box.replaceChildren();
  button.disabled = true;
  let waiting = true;
  say("Finding duplicate groups…");
  const poll = setInterval(async () => {
    try {
      const now = await getJSON(`${API}/duplicates/progress`);
      if (now.running && waiting) say(progressText(now));
    } catch {
      // The answer itself will say what went wrong.
    }
  }, 1000);
  try {
    const found = await getJSON(`${API}/duplicates${$("existing-only").checked ? "?existing_only=1" : ""}`);
    const summary = `${found.groups.length} group(s) at similarity ≥ ${found.threshold.toFixed(4)} (${found.reason})`;
    box.append(element("p", "", summary));
    found.groups.forEach((group, n) => {
      box.append(element("h3", "", `Group ${n + 1}: ${group.tier}, ${group.members.length} files`));
      const list = element("ol", "grid");
      for (const member of group.members) {
        const item = element("li", member.missing ? "missing" : "");
        const role = member.missing
          ? "missing"
          : member.path === group.keep
            ? "keep"
            : member.identical
              ? "identical bytes"
              : "copy";
        item.append(
          picture(member.id, member.path, () => searchIndexed(member.id, member.path), member.missing),
          element("span", member.path === group.keep ? "keep" : "score", `${role} · ${member.score.toFixed(4)}`),
          element("span", "meaning", `${member.width}×${member.height} · ${(member.bytes / 1024).toFixed(0)} KB`),
          fileLink(member.id, member.path),
        );
        list.append(item);
      }
      box.append(list);
    });
    say(summary);
  } catch (error) {
    say(error.message, true);
  } finally {
    waiting = false;
    clearInterval(poll);
    button.disabled = false;
  }
}

const PAGE = 48;
let browsed = 0;

async function showImages(offset) {
  try {
    const found = await getJSON(`${API}/images?offset=${offset}&limit=${PAGE}`);
    browsed = found.offset;
    const list = $("images");
    list.replaceChildren();
    for (const image of found.images) {
      const item = element("li");
      item.dataset.id = image.id;
      item.dataset.path = image.path;
      item.append(picture(image.id, image.path, () => searchIndexed(image.id, image.path)), fileLink(image.id, image.path));
      list.append(item);
    }
    const last = Math.min(found.offset + found.images.length, found.total);
    $("page-of").textContent = `${found.offset + 1}–${last} of ${found.total.toLocaleString("en")}`;
    $("previous").disabled = found.offset === 0;
    $("next").disabled = last >= found.total;
    $("pages").hidden = false;
  } catch (error) {
    say(error.message, true);
  }
}

function firstFile(items) {
  for (const item of items || []) {
    const file = item instanceof File ? item : item.kind === "file" ? item.getAsFile() : null;
    if (file) return file;
  }
  return null;
}

function wire() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => searchFile(event.target.files[0]));
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    searchFile(firstFile(event.dataTransfer.files));
  });
  document.addEventListener("paste", (event) => {
    const file = firstFile(event.clipboardData && event.clipboardData.items);
    if (file) searchFile(file);
  });
  for (const option of ["k", "existing-only"]) {
    $(option).addEventListener("change", () => repeat && repeat());
  }
  $("show-dups").addEventListener("click", showDuplicates);
  $("show-images").addEventListener("click", () => showImages(0));
  $("previous").addEventListener("click", () => showImages(Math.max(0, browsed - PAGE)));
  $("next").addEventListener("click", () => showImages(browsed + PAGE));
  showInfo();
}

wire();
