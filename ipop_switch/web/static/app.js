// The overlay view: draws the graph the agent streams (server-sent events) as SVG.
// Everything shown comes from /api/*; text from peers goes in with textContent only.
"use strict";
(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const W = 1000, H = 720, R = 34;
  const params = new URLSearchParams(location.search);
  let overlay = params.get("overlay") || "";
  let graph = null;
  let selected = null;           // {kind: "node"|"link", id}

  function el(tag, attrs, parent, text) {
    const e = document.createElementNS(SVG, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    if (parent) parent.appendChild(e);
    return e;
  }
  function h(tag, text, parent) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = text;
    if (parent) parent.appendChild(e);
    return e;
  }
  function rate(bps) {
    if (bps === null || bps === undefined) return "-";
    if (bps >= 1e9) return (bps / 1e9).toFixed(2) + " Gbit/s";
    if (bps >= 1e6) return (bps / 1e6).toFixed(1) + " Mbit/s";
    if (bps >= 1e3) return (bps / 1e3).toFixed(1) + " kbit/s";
    return Math.round(bps) + " bit/s";
  }
  function ms(v) { return v === null || v === undefined ? "-" : v.toFixed(v < 10 ? 2 : 1) + " ms"; }
  function secs(v) {
    if (v === null || v === undefined) return "-";
    if (v < 120) return v.toFixed(1) + " s";
    if (v < 7200) return (v / 60).toFixed(1) + " min";
    return (v / 3600).toFixed(1) + " h";
  }
  function short(id) { return id.slice(0, 8); }

  function layout(nodes) {
    // on a circle in node-id order: the overlay's ring, as the topology sees it
    const pos = {}, n = nodes.length;
    const r = Math.min(W, H) / 2 - 95;
    nodes.forEach((node, i) => {
      const a = -Math.PI / 2 + (2 * Math.PI * i) / Math.max(n, 1);
      pos[node.id] = n === 1 ? [W / 2, H / 2] : [W / 2 + r * Math.cos(a), H / 2 + r * Math.sin(a)];
    });
    return pos;
  }

  function fit(points) {
    // zoom to the drawing: room around it for the labels, the whole graph in view
    if (!points.length) return;
    const xs = points.map(p => p[0]), ys = points.map(p => p[1]);
    const x0 = Math.min(...xs) - 140, x1 = Math.max(...xs) + 140;
    const y0 = Math.min(...ys) - 70, y1 = Math.max(...ys) + 80;
    document.getElementById("graph").setAttribute("viewBox", [x0, y0, x1 - x0, y1 - y0].join(" "));
  }

  function render(g) {
    graph = g;
    document.getElementById("overlay-name").textContent = g.overlay;
    document.title = "ipop-switch " + g.overlay;
    const c = document.getElementById("counts");
    for (const k of ["nodes", "links", "down", "relayed"]) c.dataset[k] = g.counts[k];
    c.textContent = g.counts.nodes + " nodes, " + g.counts.links + " links (" + g.counts.relayed + " relayed" +
      (g.counts.down ? ", " + g.counts.down + " down" : "") + ")" +
      (g.topology && g.topology.mode ? " · " + g.topology.mode : "");
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
    const pos = layout(g.nodes);
    fit(Object.values(pos));
    const names = {};
    g.nodes.forEach(n => { names[n.id] = n.name; });
    const gl = document.getElementById("links"), gt = document.getElementById("labels"),
          gn = document.getElementById("nodes");
    gl.replaceChildren(); gt.replaceChildren(); gn.replaceChildren();
    for (const l of g.links) {
      const [x1, y1] = pos[l.a], [x2, y2] = pos[l.b];
      const cls = "link path-" + l.path + " state-" + l.state + (l.on_demand ? " on-demand" : "") +
        (selected && selected.kind === "link" && selected.id === l.id ? " selected" : "");
      const line = el("line", {x1, y1, x2, y2, class: cls, "data-id": l.id, "data-a": l.a, "data-b": l.b,
                               "data-path": l.path, "data-state": l.state, "data-role": l.role || ""}, gl);
      el("title", {}, line, names[l.a] + " - " + names[l.b] + ": " + l.path);
      const hit = el("line", {x1, y1, x2, y2, class: "link-hit"}, gl);
      for (const e of [line, hit]) e.addEventListener("click", () => select("link", l.id));
      // the label a third of the way from the lower id: crossing links keep theirs apart
      const mx = x1 + (x2 - x1) * 0.36, my = y1 + (y2 - y1) * 0.36;
      const tot = (l.a_to_b_bps || 0) + (l.b_to_a_bps || 0);
      const txt = (l.path === "relay" ? "relayed · " : "") + ms(l.rtt_ms) + " · " + rate(tot);
      el("text", {x: mx, y: my - 6, class: "link-label", "text-anchor": "middle"}, gt, txt);
    }
    for (const n of g.nodes) {
      const [x, y] = pos[n.id];
      const cls = "node state-" + n.state + (selected && selected.kind === "node" && selected.id === n.id ? " selected" : "");
      const grp = el("g", {class: cls, transform: "translate(" + x + "," + y + ")", "data-id": n.id,
                           "data-state": n.state, "data-name": n.name}, gn);
      el("circle", {r: R}, grp);
      el("text", {y: 5, class: "name"}, grp, n.name.length > 9 ? n.name.slice(0, 8) + "…" : n.name);
      el("text", {y: R + 16, class: "sub"}, grp, short(n.id) + (n.addresses.length ? "  " + n.addresses[0] : ""));
      let extra = n.guests.length ? n.guests.length + " guest" + (n.guests.length > 1 ? "s" : "") : "";
      if (n.state === "self") extra = "this node" + (extra ? " · " + extra : "");
      if (extra) el("text", {y: R + 31, class: "sub"}, grp, extra);
      if (n.state === "down") el("text", {y: -R - 8, class: "badge badge-down"}, grp, "DOWN");
      else if (n.state === "waiting") el("text", {y: -R - 8, class: "badge"}, grp, "…");
      grp.addEventListener("click", () => select("node", n.id));
    }
    details();
  }

  function select(kind, id) { selected = {kind, id}; render(graph); }

  function rows(table, pairs) {
    for (const [k, v] of pairs) {
      const tr = h("tr", undefined, table);
      h("td", k, tr);
      h("td", v === null || v === undefined || v === "" ? "-" : String(v), tr);
    }
  }
  function drops(d) {
    const e = Object.entries(d || {});
    return e.length ? e.map(([k, v]) => k + " " + v).join(", ") : "none";
  }

  function details() {
    const box = document.getElementById("details");
    if (!selected || !graph) return;
    box.replaceChildren();
    if (selected.kind === "node") {
      const n = graph.nodes.find(x => x.id === selected.id);
      if (!n) { h("p", "That node is gone from the overlay.", box).className = "hint"; return; }
      h("h2", n.name, box);
      const t = h("table", undefined, box);
      rows(t, [["node id", n.id], ["state", n.state], ["addresses", n.addresses.join(", ")],
               ["links", n.links + (n.more_links ? " (+" + n.more_links + " not summarized)" : "")],
               ["summary age", n.state === "self" ? "(this node)" : secs(n.summary_age_s)]]);
      for (const gst of n.guests) rows(t, [["guest " + gst.name, (gst.addresses || []).join(", ")]]);
      return;
    }
    const l = graph.links.find(x => x.id === selected.id);
    if (!l) { h("p", "That link is gone.", box).className = "hint"; return; }
    const na = graph.nodes.find(x => x.id === l.a), nb = graph.nodes.find(x => x.id === l.b);
    h("h2", (na ? na.name : short(l.a)) + " ↔ " + (nb ? nb.name : short(l.b)), box);
    const t = h("table", undefined, box);
    rows(t, [["path", l.path === "relay" ? "relayed (TURN)" : l.path], ["state", l.state], ["role", l.role],
             ["RTT", ms(l.rtt_ms)], [(na ? na.name : "a") + " → " + (nb ? nb.name : "b"), rate(l.a_to_b_bps)],
             [(nb ? nb.name : "b") + " → " + (na ? na.name : "a"), rate(l.b_to_a_bps)], ["uptime", secs(l.uptime_s)],
             ["reported by", l.source === "lsa" ? "link-state only" : Object.keys(l.ends).length + " end(s)"]]);
    for (const side of ["a", "b"]) {
      const e = l.ends[side];
      if (!e) continue;
      const who = side === "a" ? na : nb;
      h("h2", "seen from " + (who ? who.name : side), box);
      const te = h("table", undefined, box);
      const r = [["candidate pair", e.cand], ["handshake age", secs(e.hs_s)], ["drops", drops(e.drops)],
                 ["uptime", secs(e.uptime_s)]];
      if (e.local) r.push(["local", e.local]);
      if (e.remote) r.push(["remote", e.remote]);
      if (e.tx_bytes !== undefined && e.tx_bytes !== null) r.push(["tx / rx bytes", e.tx_bytes + " / " + e.rx_bytes]);
      rows(te, r);
    }
  }

  function live(on) { document.getElementById("live").dataset.live = on ? "1" : "0"; }

  function start() {
    const q = overlay ? "?overlay=" + encodeURIComponent(overlay) : "";
    fetch("/api/graph" + q).then(r => r.ok ? r.json() : null).then(g => { if (g && !graph) render(g); }).catch(() => {});
    const es = new EventSource("/api/events" + q);
    es.addEventListener("graph", ev => { live(true); render(JSON.parse(ev.data)); });
    es.onerror = () => live(false);       // EventSource reconnects by itself
  }

  fetch("/api/overlays").then(r => r.json()).then(d => {
    const pick = document.getElementById("overlay-pick");
    if (d.overlays.length > 1) {
      pick.hidden = false;
      for (const o of d.overlays) { const opt = h("option", o, pick); opt.value = o; }
      pick.value = overlay || d.overlays[0];
      pick.addEventListener("change", () => { location.search = "?overlay=" + encodeURIComponent(pick.value); });
    }
  }).catch(() => {});
  start();
})();
