"""Evaluation outputs: the confusion matrix and IoU tables, image dumps and pictures, the HTML results page."""
