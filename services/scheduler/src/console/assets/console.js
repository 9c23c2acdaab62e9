// fleetpatch console: live updates of a rollout's summary, confirm dialogs,
// and loading a rollout file into the text box. No framework, no inline
// script (the page's CSP forbids it), nothing fetched from elsewhere.
"use strict";

(function () {
  // Confirm dialogs: any form with data-confirm asks first. Delegated, so
  // forms swapped in by the live updates are covered too.
  document.addEventListener("submit", function (event) {
    var form = event.target;
    var question = form && form.getAttribute && form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) {
      event.preventDefault();
    }
  });

  // A file picked for the rollout text box is read into it.
  document.addEventListener("change", function (event) {
    var input = event.target;
    var into = input && input.getAttribute && input.getAttribute("data-into");
    if (!into || !input.files || !input.files[0]) {
      return;
    }
    var reader = new FileReader();
    reader.onload = function () {
      document.getElementById(into).value = String(reader.result);
    };
    reader.readAsText(input.files[0]);
  });

  // Live updates: the element with data-live is replaced by the fragment
  // at that URL every few seconds, until the rollout is final.
  var PERIOD_MS = 1500;
  function poll(section) {
    var url = section.getAttribute("data-live");
    var summary = section.querySelector("[data-final]");
    if (summary && summary.getAttribute("data-final") === "true") {
      return;
    }
    fetch(url, { credentials: "same-origin", headers: { Accept: "text/html" } })
      .then(function (response) {
        if (response.status === 401) {
          window.location.assign("/login");
          return null;
        }
        return response.ok ? response.text() : null;
      })
      .then(function (html) {
        if (html !== null && html !== undefined) {
          section.innerHTML = html;
          section.setAttribute("data-updated", String(Date.now()));
        }
      })
      .catch(function () {
        // The scheduler is restarting or the network is gone: try again later.
      })
      .then(function () {
        window.setTimeout(function () { poll(section); }, PERIOD_MS);
      });
  }
  function start() {
    var sections = document.querySelectorAll("[data-live]");
    for (var i = 0; i < sections.length; i++) {
      (function (section) {
        window.setTimeout(function () { poll(section); }, PERIOD_MS);
      })(sections[i]);
    }
  }
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
