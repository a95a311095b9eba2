/* kvmtop.native._sampler.entry_cost(runs): see entry_cost.c */
#ifndef KVMTOP_ENTRY_COST_H
#define KVMTOP_ENTRY_COST_H
#include <Python.h>
PyObject *entry_cost(PyObject *module, PyObject *args);
#endif
