"""Library passes, one family per module, each a rule table of the rewrite engine
(:mod:`fxopt.rewrite`). They do not register themselves: :mod:`fxopt.registry` names them and
imports a module when its name is first used."""
