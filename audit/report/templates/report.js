// Sorting and filtering for the class table; the page reads the same without it.
(function () {
  "use strict";
  var table = document.getElementById("class-table");
  if (!table) { return; }
  var body = table.tBodies[0];
  var headers = table.tHead.rows[0].cells;
  function key(row, index, numeric) {
    var cell = row.cells[index];
    var text = cell.hasAttribute("data-value") ? cell.getAttribute("data-value") : cell.textContent.trim();
    if (!numeric) { return text.toLowerCase(); }
    var number = parseFloat(text);
    return isNaN(number) ? -Infinity : number;
  }
  Array.prototype.forEach.call(headers, function (header, index) {
    var type = header.getAttribute("data-type");
    if (!type) { return; }
    var button = document.createElement("button");
    button.type = "button";
    button.textContent = header.textContent;
    header.textContent = "";
    header.appendChild(button);
    button.addEventListener("click", function () {
      var ascending = header.getAttribute("aria-sort") !== "ascending";
      Array.prototype.forEach.call(headers, function (other) { other.removeAttribute("aria-sort"); });
      header.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      var numeric = type === "number";
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = key(a, index, numeric), y = key(b, index, numeric);
        var order = x < y ? -1 : (x > y ? 1 : 0);
        return ascending ? order : -order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
  var filter = document.getElementById("class-filter");
  document.getElementById("filter-box").hidden = false;
  filter.addEventListener("input", function () {
    var query = filter.value.trim().toLowerCase();
    Array.prototype.forEach.call(body.rows, function (row) {
      row.hidden = query !== "" && row.textContent.toLowerCase().indexOf(query) < 0;
    });
  });
})();
