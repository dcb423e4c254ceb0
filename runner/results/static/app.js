// The results pages: plain DOM (textContent only: nothing from the store is parsed as HTML)
// and uPlot for the charts; everything comes from this server's /api.
"use strict";
var Results = (function () {
  var BASE = ["key", "project", "status", "attempts", "host", "start", "duration"];

  function el(tag, text, cls) {
    var node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }
  function fmtTime(t) { return t == null ? "-" : new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19); }
  function fmt(column, v) {
    if (v === null || v === undefined) return "-";
    if (column === "start" || column === "stop" || column === "updated") return fmtTime(v);
    if (column === "duration") return v.toFixed(1) + "s";
    if (typeof v === "number" && !Number.isInteger(v)) return Number(v.toPrecision(6)).toString();
    return String(v);
  }
  function getJSON(url) {
    return fetch(url, {cache: "no-store"}).then(function (r) {
      if (!r.ok) throw new Error(url + ": " + r.status);
      return r.json();
    });
  }
  function fillSelect(select, values) {
    // Left alone when its choices are the same: rebuilding an open list closes it under
    // the user's pointer (and stales the option a test is about to pick).
    var shown = Array.from(select.options).slice(1).map(function (o) { return o.value; });
    if (shown.join("\n") === values.join("\n")) return;
    var current = select.value;
    while (select.options.length > 1) select.remove(1);
    values.forEach(function (v) { var o = el("option", v); o.value = v; select.appendChild(o); });
    select.value = values.indexOf(current) >= 0 ? current : "";
  }

  function listPage() {
    var sortColumn = null, descending = false, data = [];
    var project = document.getElementById("project"), status = document.getElementById("status");
    var search = document.getElementById("search");
    function metricsOf(rows) {
      var names = {};
      rows.forEach(function (r) { Object.keys(r.metrics).forEach(function (n) { names[n] = 1; }); });
      return Object.keys(names).sort();
    }
    function value(row, column) { return BASE.indexOf(column) >= 0 ? row[column] : row.metrics[column]; }
    function render() {
      var metrics = metricsOf(data), columns = BASE.concat(metrics);
      var head = document.getElementById("head");
      head.textContent = "";
      columns.forEach(function (c) {
        var th = el("th", c + (c === sortColumn ? (descending ? " ▼" : " ▲") : ""));
        th.dataset.column = c;
        th.onclick = function () {
          descending = sortColumn === c ? !descending : false;
          sortColumn = c; render();
        };
        head.appendChild(th);
      });
      var text = search.value.toLowerCase();
      var rows = data.filter(function (r) {
        return (!project.value || r.project === project.value) &&
               (!status.value || r.status === status.value) &&
               (!text || [r.key, r.host, r.attempt].join(" ").toLowerCase().indexOf(text) >= 0);
      });
      if (sortColumn) {
        rows.sort(function (a, b) {
          var x = value(a, sortColumn), y = value(b, sortColumn);
          if (x == null) return 1; if (y == null) return -1;
          var order = x < y ? -1 : x > y ? 1 : 0;
          return descending ? -order : order;
        });
      }
      var body = document.querySelector("#experiments tbody");
      body.textContent = "";
      rows.forEach(function (r) {
        var tr = el("tr");
        tr.dataset.key = r.key;
        tr.dataset.status = r.status;
        columns.forEach(function (c) {
          var td = el("td", null, BASE.indexOf(c) < 0 || c === "attempts" || c === "duration" ? "num" : "");
          if (c === "key") {
            var a = el("a", r.key);
            a.href = "/experiments/" + encodeURIComponent(r.project) + "/" + encodeURIComponent(r.key);
            td.appendChild(a);
          } else if (c === "status") {
            td.appendChild(el("span", r.status, "status status-" + r.status));
          } else {
            td.textContent = fmt(c, value(r, c));
          }
          tr.appendChild(td);
        });
        body.appendChild(tr);
      });
      document.getElementById("count").textContent = rows.length + " of " + data.length;
    }
    function load() {
      return getJSON("/api/experiments").then(function (reply) {
        data = reply.experiments;
        fillSelect(project, Array.from(new Set(data.map(function (r) { return r.project; }))).sort());
        fillSelect(status, Array.from(new Set(data.map(function (r) { return r.status; }))).sort());
        render();
        var notes = [];
        if (reply.sync_error) notes.push(reply.sync_error);
        (reply.unreadable || []).forEach(function (p) { notes.push(p[0] + "/" + p[1] + " unreadable: " + p[2]); });
        document.getElementById("updated").textContent = "updated " + fmtTime(Date.now() / 1000) +
          (notes.length ? " — " + notes.join("; ") : "");
        document.body.dataset.loaded = "1";
        setTimeout(load, reply.refresh * 1000);
      }).catch(function (e) {
        document.getElementById("updated").textContent = String(e);
        setTimeout(load, 5000);
      });
    }
    [project, status].forEach(function (s) { s.onchange = render; });
    search.oninput = render;
    load();
  }

  function experimentPage() {
    var parts = location.pathname.split("/");
    var project = decodeURIComponent(parts[2]), key = decodeURIComponent(parts[3]);
    var charts = {};
    window.charts = charts;
    document.getElementById("title").textContent = project + " / " + key;
    function drawCharts(history) {
      var names = Object.keys(history).sort();
      document.getElementById("no-charts").hidden = names.length > 0;
      var box = document.getElementById("charts");
      names.forEach(function (name) {
        // x: the point's number in the history (points of one run are often printed within
        // the same millisecond, so time would stack them); its time is in the API reply.
        var times = history[name][0];
        var series = [times.map(function (_t, i) { return i + 1; }), history[name][1]];
        var chart = charts[name];
        if (chart) {
          chart.setData(series);
        } else {
          var holder = el("div", null, "chart");
          holder.dataset.metric = name;
          holder.appendChild(el("h3", name));
          box.appendChild(holder);
          chart = new uPlot({
            width: 420, height: 220,
            scales: {x: {time: false}},
            axes: [{label: "point"}, {}],
            series: [{label: "point"}, {label: name, stroke: "#1f77b4", width: 2, points: {show: true, size: 5}}]
          }, series, holder);
          charts[name] = chart;
        }
        chart.root.parentNode.dataset.points = String(series[0].length);
      });
    }
    function load() {
      return getJSON("/api/experiments/" + encodeURIComponent(project) + "/" + encodeURIComponent(key)).then(function (reply) {
        var e = reply.experiment, runner = (reply.scrape && reply.scrape.runner) || {};
        var badge = document.getElementById("status");
        badge.textContent = e.status;
        badge.className = "status status-" + e.status;
        var facts = document.getElementById("facts");
        facts.textContent = "";
        [["attempt", e.attempt], ["attempts", e.attempts], ["host", e.host],
         ["start", fmtTime(e.start)], ["stop", fmtTime(e.stop)], ["duration", fmt("duration", e.duration)],
         ["exit code", runner.exit_code], ["error", runner.error], ["message", runner.message],
         ["queue", runner.queue], ["disk use", runner.disk_use]].forEach(function (pair) {
          if (pair[1] === undefined || pair[1] === null || pair[1] === "") return;
          facts.appendChild(el("dt", pair[0]));
          facts.appendChild(el("dd", pair[1]));
        });
        drawCharts(reply.history);
        document.getElementById("output").textContent = reply.output_tail || "";
        var list = document.getElementById("artifacts");
        list.textContent = "";
        reply.artifacts.forEach(function (a) {
          var li = el("li");
          if (a.stored) {
            var link = el("a", a.label);
            link.href = a.href;
            li.appendChild(link);
            li.appendChild(document.createTextNode(" (" + a.size + " bytes)"));
          } else {
            li.textContent = a.label + " (not stored)";
          }
          list.appendChild(li);
        });
        document.body.dataset.loaded = "1";
        document.body.dataset.status = e.status;
        if (reply.final_statuses.indexOf(e.status) < 0) setTimeout(load, reply.refresh * 1000);
      }).catch(function (err) {
        document.getElementById("output").textContent = String(err);
        setTimeout(load, 5000);
      });
    }
    load();
  }
  return {listPage: listPage, experimentPage: experimentPage};
})();
