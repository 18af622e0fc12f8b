"""The adapter's wire format under SecAgg+ (server/secure_aggregation.py, client/secure_aggregation.py).

Flower's SecAgg+ carries a model as an ordered list of arrays (the legacy ``FitIns``/``FitRes``
``Parameters``). The server names the order: the adapter's tensor names travel in the round's
config under ``ADAPTER_KEYS`` (one string, newline-separated), and the client answers with its adapter in exactly that order,
after checking the names match its own.
"""

ADAPTER_KEYS = "adapter-keys"
SECURE_ERROR = "secure aggregation"

# Under distributed noise the popularity prior's histogram also goes through SecAgg+, whose
# values must lie within ±secagg-clipping-range: a site sends its counts in thousands.
HISTOGRAM_UNIT = 1e-3
PRIOR_PHASE = "prior"  # the `phase` a SecAgg+ round's config names when it sums histograms
