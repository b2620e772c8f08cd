# Runs a command-line program and checks what it did (tests/CMakeLists.txt, lora_cli_test):
#   cmake -DCOMMAND="exe|arg|..."  the program and its arguments, joined with "|" (ctest splits a ";" list);
#                                  an empty argument ("exe|--scale|") is passed as an empty string; cmake
#                                  strips whitespace at the end of a -D value, so a last argument cannot end in one
#         -DEXPECT_RC=N            the exit status it must give
#   and any of these (a check left out or given empty is not made):
#         [-DSTDOUT_REGEX=re]      stdout must match the CMake regex re
#         [-DSTDOUT_NOT_REGEX=re]  stdout must not match re
#         [-DSTDERR_REGEX=re] [-DSTDERR_NOT_REGEX=re]  the same for stderr
#         [-DSTDERR_ONE_LINE=ON]   stderr is exactly one line
#         [-DSTDERR_LINES=n]       stderr is exactly n lines: the first "<tool>: <what failed>", each other one
#                                  problem indented by two spaces (tools/cli.hpp, error_lines)
#         [-DPRINTABLE=ON]         neither stdout nor stderr holds a control character but newline (C0, DEL, C1)
#                                  nor a Unicode bidi override or isolate: nothing lora::printable escapes
#         -P run_cli.cmake
cmake_minimum_required(VERSION 3.16)  # a script gets no policies otherwise: "if" must not dereference quoted text

# execute_process(COMMAND ${list}) would drop empty arguments, and a CMake list splits wrongly after a "[", so
# COMMAND is cut at each "|" by hand, and the call written out with each argument quoted and run from a file.
set(call "execute_process(COMMAND")
set(rest "${COMMAND}")
while(1)
  string(FIND "${rest}" "|" at)
  if(at EQUAL -1)
    set(arg "${rest}")
  else()
    string(SUBSTRING "${rest}" 0 ${at} arg)
    math(EXPR next "${at} + 1")
    string(SUBSTRING "${rest}" ${next} -1 rest)
  endif()
  string(REPLACE "\\" "\\\\" arg "${arg}")
  string(REPLACE "\"" "\\\"" arg "${arg}")
  string(REPLACE "$" "\\$" arg "${arg}")
  string(APPEND call " \"${arg}\"")
  if(at EQUAL -1)
    break()
  endif()
endwhile()
string(APPEND call " RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)\n")
string(RANDOM LENGTH 16 tag)
set(call_file "${CMAKE_CURRENT_BINARY_DIR}/run_cli_${tag}.cmake")
file(WRITE "${call_file}" "${call}")
include("${call_file}")
file(REMOVE "${call_file}")

message("exit status ${rc}\n--- stdout\n${out}--- stderr\n${err}---")
if(NOT rc STREQUAL EXPECT_RC)
  message(FATAL_ERROR "expected exit status ${EXPECT_RC}, got ${rc}")
endif()
foreach(stream IN ITEMS stdout stderr)
  string(TOUPPER ${stream} STREAM)
  if(stream STREQUAL "stdout")
    set(text "${out}")
  else()
    set(text "${err}")
  endif()
  if(NOT "${${STREAM}_REGEX}" STREQUAL "" AND NOT text MATCHES "${${STREAM}_REGEX}")
    message(FATAL_ERROR "${stream} does not match: ${${STREAM}_REGEX}")
  endif()
  if(NOT "${${STREAM}_NOT_REGEX}" STREQUAL "" AND text MATCHES "${${STREAM}_NOT_REGEX}")
    message(FATAL_ERROR "${stream} matches what it must not: ${${STREAM}_NOT_REGEX}")
  endif()
endforeach()
if(STDERR_ONE_LINE)
  string(REGEX MATCHALL "\n" newlines "${err}")
  list(LENGTH newlines lines)
  if(NOT lines EQUAL 1)
    message(FATAL_ERROR "expected exactly one line on stderr, got ${lines}")
  endif()
endif()
if(NOT "${STDERR_LINES}" STREQUAL "")
  string(REGEX MATCHALL "\n" newlines "${err}")
  list(LENGTH newlines lines)
  if(NOT lines EQUAL STDERR_LINES)
    message(FATAL_ERROR "expected ${STDERR_LINES} lines on stderr, got ${lines}")
  endif()
  string(REGEX MATCHALL "\n[^\n]*" rest "${err}")
  foreach(line IN LISTS rest)
    if(NOT line STREQUAL "\n" AND NOT line MATCHES "^\n  [^ ]")
      message(FATAL_ERROR "a line after the first on stderr is not one problem indented by two spaces: ${line}")
    endif()
  endforeach()
endif()
if(PRINTABLE)
  # The bytes are built here: a CMake regex has no \x escape. C0 without newline (10), DEL; C1 (U+0080-9F) as
  # UTF-8 C2 80-9F; U+202A-E as E2 80 AA-AE; U+2066-9 as E2 81 A6-A9.
  set(c0 "")
  foreach(code RANGE 1 31)
    if(NOT code EQUAL 10)
      string(ASCII ${code} byte)
      string(APPEND c0 "${byte}")
    endif()
  endforeach()
  foreach(code 127 128 129 159 166 169 170 174 194 226)
    string(ASCII ${code} b${code})
  endforeach()
  set(unprintable "[${c0}${b127}]|${b194}[${b128}-${b159}]")
  string(APPEND unprintable "|${b226}${b128}[${b170}-${b174}]|${b226}${b129}[${b166}-${b169}]")
  if(out MATCHES "${unprintable}" OR err MATCHES "${unprintable}")
    message(FATAL_ERROR "stdout or stderr holds a control character or a bidi override, printed raw")
  endif()
endif()
