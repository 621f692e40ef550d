// callgate admin: the little JavaScript there is. Every page works without it.
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  // "Are you sure?" before a delete (the grid's delete also has a confirmation page).
  document.querySelectorAll("[data-confirm]").forEach(function (button) {
    button.addEventListener("click", function (event) {
      if (!window.confirm(button.getAttribute("data-confirm"))) { event.preventDefault(); }
    });
  });
  // The grid's "select all on this page".
  var all = document.getElementById("select-all");
  if (all) {
    all.addEventListener("change", function () {
      document.querySelectorAll("input[name=numbers]").forEach(function (box) { box.checked = all.checked; });
    });
  }
  // A running job's progress: poll its status, reload the page when it ends.
  var job = document.getElementById("job");
  if (job && job.getAttribute("data-state") === "running") {
    var bar = document.getElementById("job-progress"), text = document.getElementById("job-text");
    var poll = function () {
      fetch(job.getAttribute("data-status-url"), {credentials: "same-origin"})
        .then(function (r) { return r.json(); })
        .then(function (s) {
          if (s.state !== "running") { window.location.reload(); return; }
          if (s.total) { bar.max = s.total; }
          bar.value = s.done;
          text.textContent = "Running" + (s.phase ? " (" + s.phase + ")" : "") + ": " + s.done + " of " +
            (s.total || "?") + " after " + s.seconds + " s.";
          window.setTimeout(poll, 700);
        })
        .catch(function () { window.setTimeout(poll, 2000); });
    };
    window.setTimeout(poll, 300);
  }
});
