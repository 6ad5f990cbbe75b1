// One MathJax configuration for Markdown pages (arithmatex emits \( \) and \[ \]) and for notebooks,
// whose cells keep $ and $$ delimiters: scan the whole page for both.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"], ["$", "$"]],
    displayMath: [["\\[", "\\]"], ["$$", "$$"]],
    processEscapes: true,
  },
};
document$.subscribe(() => {
  MathJax.startup.output.clearCache();
  MathJax.typesetClear();
  MathJax.texReset();
  MathJax.typesetPromise();
});
