"""`samkd view`: a local web page to click on images and compare two models' masks (a
student and its teacher), and to follow a training run's curves.

Gradio (`pip install 'samkd[view]'`) is imported only when the page starts; nothing else in
samkd needs this package.
"""

from samkd.view.run import VIEW_EXTRA, require_view_extra, run_view

__all__ = ["VIEW_EXTRA", "require_view_extra", "run_view"]
