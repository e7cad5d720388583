"""The LKS editor: facts in, a trained subject table out. Pure torch; never imports web code."""
