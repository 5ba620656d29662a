"""Tolerances derived from float32 arithmetic, for comparing two programs that compute the same sums.

Two XLA programs that compute the same mathematical sum (a conv at batch 2 and at batch 8, a matmul in chunks and
whole) may add its terms in different orders: which CPU kernel XLA picks depends on the shapes, the thread layout
and the CPU's vector width (AVX2 or AVX-512). Each result is then within gamma_n * sum |terms| of the exact sum
(Higham, Accuracy and Stability of Numerical Algorithms, eq. 3.5: n products summed in any order, with
gamma_n = n u / (1 - n u), u the unit roundoff), so two such results differ by at most twice that.
"""

import numpy as np


def gamma(n_terms, dtype=np.float32):
  """Higham's gamma_n: the relative error bound of a sum of n products in any order, in `dtype`."""
  u = np.finfo(dtype).eps / 2
  return n_terms * u / (1 - n_terms * u)


def assert_same_sums(got, want, abs_terms, n_terms, dtype=np.float32, err_msg=""):
  """Asserts |got - want| <= 2 gamma_n * abs_terms elementwise, where abs_terms is sum |terms| of each entry (the
  same computation on absolute values) and n_terms the number of terms per entry."""
  got, want, abs_terms = (np.asarray(a, np.float64) for a in (got, want, abs_terms))
  bound = 2 * gamma(n_terms, dtype) * abs_terms
  excess = np.abs(got - want) - bound
  assert np.all(excess <= 0), f"{err_msg} {np.sum(excess > 0)} of {excess.size} entries beyond 2 gamma_{n_terms}: " + (
    f"max |diff| {np.max(np.abs(got - want)):.3g}"
  )
