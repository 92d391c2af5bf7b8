"""Offline analysis of RUN/aux.h5: summary tables and plots, no MPI needed."""
