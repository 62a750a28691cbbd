// Training curves drawn as SVG: one chart per pair of series, against the step. Only numbers computed
// here become attributes; names are fixed. Each chart's data-points says how many steps it shows.

import { number } from "./api.js";

const SVG_NS = "http://www.w3.org/2000/svg";
export const CHARTS = [
  { svg: "loss-chart", series: ["loss", "val_loss"], floor: 0, ceiling: null },
  { svg: "accuracy-chart", series: ["accuracy", "val_accuracy"], floor: 0, ceiling: 1 },
];
export const SERIES = CHARTS.flatMap((chart) => chart.series);

function svg(tag, attributes, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

export function drawCharts(series) {
  for (const chart of CHARTS) drawChart(document.getElementById(chart.svg), chart, series);
}

function drawChart(target, chart, series) {
  const [width, height] = [600, 220];
  const [left, right, top, bottom] = [52, 12, 22, 28];
  const lines = chart.series.map((name) => [...series.get(name).entries()].sort((a, b) => a[0] - b[0]));
  const steps = new Set(lines.flatMap((line) => line.map(([step]) => step)));
  target.dataset.points = String(steps.size);
  const children = [svg("line", { x1: left, y1: height - bottom, x2: width - right, y2: height - bottom, class: "axis" }),
                    svg("line", { x1: left, y1: top, x2: left, y2: height - bottom, class: "axis" })];
  chart.series.forEach((name, index) => children.push(
    svg("text", { x: left + 8 + index * 110, y: 14, class: "legend-" + index }, "— " + name)));
  if (!steps.size) {
    children.push(svg("text", { x: left + 10, y: height / 2 }, "no data yet"));
    target.replaceChildren(...children);
    return;
  }
  // loops, not Math.min(...values): a long-watched job has more points than a call may take arguments
  let [xMin, xMax] = [Infinity, -Infinity];
  let [yMin, yMax] = [chart.floor, chart.ceiling === null ? -Infinity : chart.ceiling];
  for (const line of lines) {
    for (const [step, value] of line) {
      [xMin, xMax] = [Math.min(xMin, step), Math.max(xMax, step)];
      [yMin, yMax] = [Math.min(yMin, value), Math.max(yMax, value)];
    }
  }
  if (yMax <= yMin) yMax = yMin + 1;
  const x = (step) => left + (xMax > xMin ? (step - xMin) / (xMax - xMin) : 0.5) * (width - left - right);
  const y = (value) => height - bottom - ((value - yMin) / (yMax - yMin)) * (height - top - bottom);
  lines.forEach((line, index) => {
    if (!line.length) return;
    const points = line.map(([step, value]) => `${x(step).toFixed(1)},${y(value).toFixed(1)}`).join(" ");
    children.push(svg("polyline", { points, class: "series series-" + index, "data-series": chart.series[index] }));
  });
  children.push(svg("text", { x: left - 6, y: top + 4, "text-anchor": "end" }, number(yMax)),
                svg("text", { x: left - 6, y: height - bottom, "text-anchor": "end" }, number(yMin)),
                svg("text", { x: left, y: height - 8 }, "step " + xMin),
                svg("text", { x: width - right, y: height - 8, "text-anchor": "end" }, "step " + xMax));
  target.replaceChildren(...children);
}
