"""Measured default backend order per device type, op and dtype (generated; do not edit by hand).

Written by benchmarks/choose_defaults.py from the recorded benchmark results named below; the
registry (saq_kernels/backends/__init__.py) tries these backends first, then the device type's
default order. EVIDENCE says why: the rows used, and each candidate's geometric-mean time ratio to
the fastest one per shape, over the shapes all of them were measured at.
"""
from typing import Dict, List


#: device type -> the result files its orders were chosen from
SOURCES: Dict[str, str] = {
    'cpu': 'benchmarks/results/cpu-intel-xeon-processor-2t.csv',
    'cuda': 'benchmarks/results/nvidia-h200.csv',
}

#: device type -> backends left out of its orders (--exclude: their tests had failed
#: on that run), so that the orders can be derived again from the same files
EXCLUDED: Dict[str, List[str]] = {
}

#: device type -> op -> dtype -> backend names, fastest first
MEASURED_ORDER: Dict[str, Dict[str, Dict[str, List[str]]]] = {
    'cpu': {
        'fake_quantize': {
            'bf16': ['cpp', 'reference'],
            'fp16': ['cpp', 'reference'],
            'fp32': ['cpp', 'reference'],
        },
        'fake_quantize_backward': {
            'bf16': ['cpp', 'reference'],
            'fp16': ['cpp', 'reference'],
            'fp32': ['cpp', 'reference'],
        },
        'grad_sq_norm': {
            'bf16': ['cpp', 'reference'],
            'fp16': ['cpp', 'reference'],
            'fp32': ['cpp', 'reference'],
        },
        'liq_quantize': {
            'bf16': ['cpp', 'reference'],
            'fp16': ['cpp', 'reference'],
            'fp32': ['cpp', 'reference'],
        },
        'liq_quantize_backward': {
            'bf16': ['cpp', 'reference'],
            'fp16': ['cpp', 'reference'],
            'fp32': ['cpp', 'reference'],
        },
        'sam_perturb_': {
            'bf16': ['cpp', 'reference'],
            'fp16': ['cpp', 'reference'],
            'fp32': ['cpp', 'reference'],
        },
        'sam_restore_': {
            'bf16': ['cpp', 'reference'],
            'fp16': ['cpp', 'reference'],
            'fp32': ['cpp', 'reference'],
        },
        'sam_restore_adamw_': {
            'bf16': ['cpp', 'reference'],
            'fp16': ['cpp', 'reference'],
            'fp32': ['cpp', 'reference'],
        },
        'sam_restore_sgd_': {
            'bf16': ['cpp', 'reference'],
            'fp16': ['cpp', 'reference'],
            'fp32': ['cpp', 'reference'],
        },
    },
    'cuda': {
        'fake_quantize': {
            'bf16': ['cuda', 'triton', 'reference'],
            'fp32': ['cuda', 'triton', 'reference'],
        },
        'fake_quantize_backward': {
            'bf16': ['cuda', 'triton', 'reference'],
            'fp32': ['cuda', 'triton', 'reference'],
        },
        'grad_sq_norm': {
            'bf16': ['cuda', 'triton', 'reference'],
            'fp32': ['cuda', 'triton', 'reference'],
        },
        'liq_quantize': {
            'bf16': ['cuda', 'triton', 'reference'],
            'fp32': ['cuda', 'triton', 'reference'],
        },
        'liq_quantize_backward': {
            'bf16': ['cuda', 'triton', 'reference'],
            'fp32': ['cuda', 'triton', 'reference'],
        },
        'sam_perturb_': {
            'bf16': ['cuda', 'triton', 'reference'],
            'fp32': ['cuda', 'triton', 'reference'],
        },
        'sam_restore_': {
            'bf16': ['cuda', 'triton', 'reference'],
            'fp32': ['cuda', 'triton', 'reference'],
        },
        'sam_restore_adamw_': {
            'bf16': ['cuda', 'triton', 'reference'],
            'fp32': ['cuda', 'triton', 'reference'],
        },
        'sam_restore_sgd_': {
            'bf16': ['cuda', 'triton', 'reference'],
            'fp32': ['cuda', 'triton', 'reference'],
        },
    },
}

#: device type -> op -> dtype -> the rows and time ratios behind the order
EVIDENCE: Dict[str, Dict[str, Dict[str, str]]] = {
    'cpu': {
        'fake_quantize': {
            'bf16': 'fwd+bwd over 9 shapes: cpp 1.00, reference 17.39',
            'fp16': 'fwd+bwd over 8 shapes: cpp 1.00, reference 17.52',
            'fp32': 'fwd+bwd over 9 shapes: cpp 1.00, reference 15.62',
        },
        'fake_quantize_backward': {
            'bf16': 'fwd+bwd over 9 shapes: cpp 1.00, reference 17.39',
            'fp16': 'fwd+bwd over 8 shapes: cpp 1.00, reference 17.52',
            'fp32': 'fwd+bwd over 9 shapes: cpp 1.00, reference 15.62',
        },
        'grad_sq_norm': {
            'bf16': 'update over 2 shapes: cpp 1.00, reference 5.90',
            'fp16': 'update over 2 shapes: cpp 1.00, reference 4.86',
            'fp32': 'update over 2 shapes: cpp 1.00, reference 3.71',
        },
        'liq_quantize': {
            'bf16': 'fwd+bwd over 9 shapes: cpp 1.00, reference 13.45',
            'fp16': 'fwd+bwd over 8 shapes: cpp 1.00, reference 12.86',
            'fp32': 'fwd+bwd over 9 shapes: cpp 1.00, reference 15.67',
        },
        'liq_quantize_backward': {
            'bf16': 'fwd+bwd over 9 shapes: cpp 1.00, reference 13.45',
            'fp16': 'fwd+bwd over 8 shapes: cpp 1.00, reference 12.86',
            'fp32': 'fwd+bwd over 9 shapes: cpp 1.00, reference 15.67',
        },
        'sam_perturb_': {
            'bf16': 'update over 2 shapes: cpp 1.00, reference 2.50',
            'fp16': 'update over 2 shapes: cpp 1.00, reference 1.99',
            'fp32': 'update over 2 shapes: cpp 1.00, reference 2.53',
        },
        'sam_restore_': {
            'bf16': 'update over 2 shapes: cpp 1.00, reference 1.20',
            'fp16': 'update over 2 shapes: cpp 1.00, reference 1.27',
            'fp32': 'update over 2 shapes: cpp 1.00, reference 1.14',
        },
        'sam_restore_adamw_': {
            'bf16': 'update over 2 shapes: cpp 1.00, reference 6.01',
            'fp16': 'update over 2 shapes: cpp 1.00, reference 4.27',
            'fp32': 'update over 2 shapes: cpp 1.00, reference 10.91',
        },
        'sam_restore_sgd_': {
            'bf16': 'update over 2 shapes: cpp 1.00, reference 4.24',
            'fp16': 'update over 2 shapes: cpp 1.00, reference 3.80',
            'fp32': 'update over 2 shapes: cpp 1.00, reference 6.39',
        },
    },
    'cuda': {
        'fake_quantize': {
            'bf16': 'fwd+bwd over 7 shapes: cuda 1.00, triton 3.34, reference 9.85',
            'fp32': 'fwd+bwd over 7 shapes: cuda 1.00, triton 3.07, reference 7.71',
        },
        'fake_quantize_backward': {
            'bf16': 'fwd+bwd over 7 shapes: cuda 1.00, triton 3.34, reference 9.85',
            'fp32': 'fwd+bwd over 7 shapes: cuda 1.00, triton 3.07, reference 7.71',
        },
        'grad_sq_norm': {
            'bf16': 'update over 3 shapes: cuda 1.00, triton 5.55, reference 24.21',
            'fp32': 'update over 3 shapes: cuda 1.00, triton 5.08, reference 16.56',
        },
        'liq_quantize': {
            'bf16': 'fwd+bwd over 7 shapes: cuda 1.00, triton 3.22, reference 9.51',
            'fp32': 'fwd+bwd over 7 shapes: cuda 1.01, triton 2.71, reference 6.39; faster elsewhere at 2^26 (triton)',
        },
        'liq_quantize_backward': {
            'bf16': 'fwd+bwd over 7 shapes: cuda 1.00, triton 3.22, reference 9.51',
            'fp32': 'fwd+bwd over 7 shapes: cuda 1.01, triton 2.71, reference 6.39; faster elsewhere at 2^26 (triton)',
        },
        'sam_perturb_': {
            'bf16': 'update over 3 shapes: cuda 1.00, triton 3.57, reference 16.40',
            'fp32': 'update over 3 shapes: cuda 1.00, triton 3.64, reference 12.80',
        },
        'sam_restore_': {
            'bf16': 'update over 3 shapes: cuda 1.00, triton 4.55, reference 6.44',
            'fp32': 'update over 3 shapes: cuda 1.00, triton 4.26, reference 5.92',
        },
        'sam_restore_adamw_': {
            'bf16': 'update over 3 shapes: cuda 1.00, triton 2.88, reference 115.30',
            'fp32': 'update over 3 shapes: cuda 1.00, triton 3.25, reference 82.48',
        },
        'sam_restore_sgd_': {
            'bf16': 'update over 3 shapes: cuda 1.00, triton 2.58, reference 66.06',
            'fp32': 'update over 3 shapes: cuda 1.00, triton 3.28, reference 32.25',
        },
    },
}
