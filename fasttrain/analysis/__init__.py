"""The SelfCon paper's analyses as one-command tools over a checkpoint or a recipe:

* ``mutual_info``: I(F(x); T(x)) between the backbone feature and the pooled output of the stage the
  sub-network attaches to (paper Fig. 6, Section 5.4), by InfoNCE, NWJ and MINE critics;
* ``grad_norms``: per-block and per-conv gradient norms of SupCon vs SelfCon-M from the same
  weights (paper Fig. 4);
* ``sweep``: the main job once per value of a recipe key, then one table and plot (Fig. 6, Table 5);
* ``pictures``: Grad-CAM per exit and a 2-D embedding of every exit's features (Fig. 5).

Each writes JSON, a markdown table and a PNG into its output folder.
"""
