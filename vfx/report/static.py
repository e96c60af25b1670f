"""The page's inline style and script: one play/pause button and one frame scrubber drive every video."""

# No network: only the page's own folder (and file: URLs next to it) may be loaded.
CSP = ("default-src 'none'; media-src 'self' file:; img-src 'self' file: data:; "
       "style-src 'unsafe-inline'; script-src 'unsafe-inline'")

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h1 { margin: 0 0 .2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
code { font: 12px ui-monospace, monospace; background: #eee; padding: 1px 4px; border-radius: 3px;
       word-break: break-all; }
.controls { display: flex; gap: 1em; align-items: center; margin: .5em 0 1em; }
.controls input[type=range] { flex: 1; max-width: 720px; }
.videos { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; background: #fff; border: 1px solid #ddd; padding: 6px; }
figure video, figure img { display: block; max-width: 100%; image-rendering: pixelated; }
video.sync { width: 256px; background: #000; }
figcaption { max-width: 256px; font-size: 12px; margin-top: 4px; }
.sheets figcaption, .plots figcaption { max-width: none; }
.todo { background: #fff4d6; border: 1px solid #e8c867; padding: .6em 1em; }
table { border-collapse: collapse; background: #fff; }
th, td { border: 1px solid #ddd; padding: 3px 6px; text-align: left; vertical-align: top; font-size: 12px; }
td.complete { color: #1a7f37; } td.stale { color: #8250df; } td.partial { color: #9a6700; }
td.missing { color: #888; } td.damaged { color: #cf222e; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; }
svg.plot { background: #fff; border: 1px solid #ddd; }
svg.plot .frame { fill: none; stroke: #bbb; }
svg.plot text { font: 11px system-ui, sans-serif; fill: #222; }
svg.plot .plot-title { font-weight: 600; }
svg.plot .empty { fill: #888; }
"""

JS = """
(function () {
  var videos = Array.prototype.slice.call(document.querySelectorAll('video.sync'));
  var play = document.getElementById('play'), scrub = document.getElementById('scrub');
  var label = document.getElementById('frame');
  if (!videos.length || !play || !scrub) return;
  var fps = parseFloat(document.body.dataset.fps), frames = parseInt(document.body.dataset.frames, 10);
  var master = videos[0];
  function frameAt(t) { return Math.max(0, Math.min(frames - 1, Math.floor(t * fps + 1e-6))); }
  function show(i) { scrub.value = i; label.textContent = 'frame ' + i + ' / ' + (frames - 1); }
  function pause() {
    videos.forEach(function (v) { v.pause(); });
    play.textContent = 'Play';
  }
  function seek(i) {
    pause();
    var t = (i + 0.5) / fps;  // the middle of frame i
    videos.forEach(function (v) { v.currentTime = t; });
    show(i);
  }
  function start() {
    var t = master.ended || frameAt(master.currentTime) >= frames - 1 ? 0 : master.currentTime;
    videos.forEach(function (v) { v.currentTime = t; });
    play.textContent = 'Pause';
    return Promise.all(videos.map(function (v) { return v.play(); })).catch(function (err) {
      pause();
      label.textContent = 'cannot play: ' + err.message;
    });
  }
  play.addEventListener('click', function () { if (master.paused) { start(); } else { pause(); } });
  scrub.addEventListener('input', function () { seek(parseInt(scrub.value, 10)); });
  master.addEventListener('ended', pause);
  function follow() {
    if (!master.paused) {
      var t = master.currentTime;
      videos.forEach(function (v) {
        if (v !== master && !v.ended && Math.abs(v.currentTime - t) > 0.5 / fps) { v.currentTime = t; }
      });
      show(frameAt(t));
    }
    window.requestAnimationFrame(follow);
  }
  window.requestAnimationFrame(follow);
  show(0);
})();
"""
